"""Adversarial training on CIFAR-10 with the ANCHOR loss (or a baseline), as users run it.

    python train.py --epochs 100 --eps 0.031                      # ANCHOR: PGD-AT + hard-mined SupCon
    python train.py --loss ce --epochs 30                         # Madry PGD-AT, the baseline
    python train.py --width 16 --limit 2000 --epochs 2 --device cpu --out quick.pt   # minutes on a CPU
    python train.py --resume --out ckpt.pt                        # continue after Ctrl-C or a crash

Writes OUT (last epoch), OUT with .best.pt (best PGD accuracy on the held-out --val slice; adversarial
training overfits late), a JSON-lines log (.jsonl) and a plot of the curves (.svg) beside it.
"""
import json
import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from anchor import anchor_loss
from attacks import pgd
from cli import (CLIError, Parser, Progress, cli, eps_type, json_safe, load_checkpoint, non_negative, positive,
                 resolve_device, save_atomic, save_atomic_text, svg_plot, to_cpu)
from data import batches, load_cifar10, split_train_val
from model import build_model

LOSSES = ("anchor", "supcon", "ce", "trades")
# Flags that do not change what is trained: on --resume they may differ from the checkpoint's.
RUNTIME_FLAGS = {"data", "device", "compile", "channels_last", "out", "resume"}
RESUME_KEYS = {"model", "optimizer", "finetune", "epoch", "step_in_epoch", "config", "device", "running", "rng", "metrics"}


def get_args(argv=None):
    p = Parser(description="Adversarial training on CIFAR-10 with the ANCHOR loss.", allow_abbrev=False)
    p.add_argument("--data", type=str, default="./data", help="folder holding cifar-10-batches-py/ (downloaded there when missing)")
    p.add_argument("--limit", type=positive(int), default=None, help="train on the first N training images only")
    p.add_argument("--val", type=non_negative(int), default=1000, help="last N training images held out for validation and best-checkpoint selection")
    p.add_argument("--epochs", type=positive(int), default=30, help="training epochs")
    p.add_argument("--finetune-epochs", type=non_negative(int), default=0, help="then K epochs training the classifier alone with CE on PGD examples, backbone frozen")
    p.add_argument("--batch-size", type=positive(int), default=512, help="images per step")
    p.add_argument("--lr", type=positive(float), default=0.2, help="peak SGD learning rate (one-cycle: linear warm-up over 15%% of steps, then cosine to 0)")
    p.add_argument("--wd", type=non_negative(float), default=5e-4, help="weight decay (SGD's L2 coefficient)")
    p.add_argument("--eps", type=eps_type, default=8 / 255, help="L-inf radius in [0, 1] pixel units (0.031 or 8/255)")
    p.add_argument("--alpha", type=positive(eps_type), default=2 / 255, help="PGD step size, pixel units")
    p.add_argument("--steps", type=positive(int), default=10, help="PGD steps for the training attack")
    p.add_argument("--loss", type=str, default="anchor", choices=LOSSES, help="anchor: CE on PGD examples + lam * anchor_loss; supcon: the same with beta=0; ce: Madry PGD-AT; trades: TRADES")
    p.add_argument("--temperature", type=positive(float), default=0.1, help="contrastive temperature")
    p.add_argument("--beta", type=non_negative(float), default=1.0, help="hard-positive mining strength (0 = SupCon)")
    p.add_argument("--lam", type=non_negative(float), default=None, help="weight of the second loss term (default 1.0 for anchor/supcon, 6.0 for TRADES)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, PGD starts, init)")
    p.add_argument("--device", type=str, default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for training (CUDA only); validation stays float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory layout (faster convolutions on CUDA, same numbers)")
    p.add_argument("--width", type=positive(int), default=64, help="ResNet-18 base width (64 = the standard model; 16 for quick CPU runs)")
    p.add_argument("--out", type=str, default="ckpt.pt", help="checkpoint path; the log, plot and best checkpoint go beside it")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --out")
    args = p.parse_args(argv)
    if args.lam is None:
        args.lam = 6.0 if args.loss == "trades" else 1.0
    if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
        p.error(f"argument --out: {args.out} is a folder; name the checkpoint file, e.g. {os.path.join(args.out, 'ckpt.pt')}")
    resolve_device(p, args)
    # Which flags the user typed (not defaults): --resume refuses those that contradict the checkpoint.
    typed = {t.split("=")[0] for t in (sys.argv[1:] if argv is None else argv) if t.startswith("--")}
    args.explicit = {a.dest for a in p._actions if typed & set(a.option_strings)}
    return args


def make_model(args, device):
    """(model, net): the network on `device`, and what the training step calls (torch.compile'd with --compile)."""
    model = build_model({"width": args.width}).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model) if args.compile else model


def make_optimizer(model, args, finetune):
    """SGD with Nesterov momentum; fine-tuning trains the classifier alone, the rest (BatchNorm too) frozen."""
    for p in model.backbone_parameters():
        p.requires_grad_(not finetune)
    params = model.classifier.parameters() if finetune else model.parameters()
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    opt.finetune = finetune  # which stage this optimizer belongs to, saved with the checkpoint
    return opt


def lr_at(step, total, peak):
    """One-cycle: linear warm-up to the peak over the first 15% of steps, then cosine decay, 0 at the last step."""
    warm = max(1, int(0.15 * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step + 1 - warm) / max(1, total - warm)))


def training_loss(net, x, x_adv, y, args, kind):
    """(total loss, [ce, second term], adversarial logits, clean logits or None) of loss `kind` for one batch."""
    if kind == "ce":
        logits_adv = net(x_adv)
        ce = F.cross_entropy(logits_adv.float(), y)
        return ce, [ce, torch.zeros_like(ce)], logits_adv, None
    if kind == "trades":
        # TRADES: CE on clean images + lam * KL(clean || adversarial) prediction; two passes, as in its
        # reference code, so BatchNorm sees clean and adversarial batches apart.
        logits_clean, logits_adv = net(x).float(), net(x_adv).float()
        ce = F.cross_entropy(logits_clean, y)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1), reduction="batchmean", log_target=True)
        return ce + args.lam * kl, [ce, kl], logits_adv, logits_clean
    # anchor / supcon: one backbone pass over both views [augmented clean, adversarial].
    logits, z = net(torch.cat([x, x_adv]), projection=True)
    logits_clean, logits_adv = logits.float().chunk(2)
    ce = F.cross_entropy(logits_adv, y)
    views = torch.stack(z.chunk(2), dim=1)  # (B, 2, proj_dim)
    con = anchor_loss(views, y, args.temperature, args.beta if kind == "anchor" else 0.0)
    return ce + args.lam * con, [ce, con], logits_adv, logits_clean


def train_step(model, net, opt, x, y, args, finetune=False):
    """One step of adversarial training: PGD examples against the model in eval mode, then one update of
    `opt` in train mode. `net` is the model or its torch.compile'd wrapper. Fine-tuning (frozen backbone)
    trains the classifier with plain CE on PGD examples, whatever the first stage's loss."""
    kind = "ce" if finetune else args.loss
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        model.eval()  # attack the model as it predicts (BatchNorm running statistics untouched)
        attack_loss = "ce"
        if kind == "trades":  # TRADES's attack ascends KL(clean prediction || adversarial prediction)
            with torch.no_grad():
                clean_logp = F.log_softmax(net(x).float(), 1)
            attack_loss = lambda logits, y: F.kl_div(F.log_softmax(logits, 1), clean_logp, reduction="none",
                                                     log_target=True).sum(1)
        x_adv = pgd(net, x, y, args.eps, args.alpha, args.steps, loss=attack_loss)
        model.train(not finetune)  # fine-tuning keeps the frozen backbone's BatchNorm in eval mode
        loss, parts, logits_adv, logits_clean = training_loss(net, x, x_adv, y, args, kind)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, parts, logits_adv, logits_clean


def evaluate(model, x, y, args, batch_size=500):
    """Clean and PGD accuracy (args.steps steps, float32, eval mode) on a uint8 set; (nan, nan) if empty."""
    if len(x) == 0:
        return float("nan"), float("nan")
    model.eval()
    correct = torch.zeros(2, device=x.device)
    for xb, yb in batches(x, y, batch_size):
        x_adv = pgd(model, xb, yb, args.eps, args.alpha, args.steps)
        with torch.no_grad():
            correct += torch.stack([(model(xb).argmax(1) == yb).sum(), (model(x_adv).argmax(1) == yb).sum()])
    clean, robust = (correct / len(x)).tolist()
    return clean, robust


def paths(out):
    stem = out[:-3] if out.endswith(".pt") else out
    return {"best": stem + ".best.pt", "log": stem + ".jsonl", "svg": stem + ".svg"}


def run_config(args):
    """The flags that decide the result, as plain types for the checkpoint."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS | {"explicit"}}


def main(args):
    files = paths(args.out)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.out)
        missing = RESUME_KEYS - set(ckpt)
        if missing or not isinstance(ckpt["config"].get("train"), dict):
            raise CLIError(f"--resume: {args.out} lacks {sorted(missing) or ['config.train']}: it was not written "
                           "by this train.py; start a new --out")
        saved = ckpt["config"]["train"]
        changed = [k for k in args.explicit if k in saved and saved[k] != getattr(args, k)]
        if changed:
            k = sorted(changed)[0]
            raise CLIError(f"--resume: {args.out} was trained with --{k.replace('_', '-')} {saved[k]}, not "
                           f"{getattr(args, k)}; drop the flag to continue it, or start a new --out")
        for k, v in saved.items():  # the checkpoint's recipe wins: the resumed run equals an uninterrupted one
            setattr(args, k, v)
        if "device" not in args.explicit:  # the same device's generators give the same data order
            args.device = ckpt["device"]
        if args.device == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--resume: {args.out} was trained on cuda, which this machine lacks; pass --device cpu "
                           "(the run continues, but not bit for bit)")
        if args.amp and args.device != "cuda":
            raise CLIError(f"--resume: {args.out} was trained with --amp, which needs --device cuda")
    else:
        taken = [p for p in [args.out, *files.values()] if os.path.exists(p)]
        if taken:
            raise CLIError(f"{taken[0]} exists; pass --resume to continue that run, or choose another --out")

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    x_train, y_train, _, _ = load_cifar10(args.data, download=True)
    x_tr, y_tr, x_val, y_val = split_train_val(x_train, y_train, args.val, args.limit)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    x_tr, y_tr, x_val, y_val = (t.to(device) for t in (x_tr, y_tr, x_val, y_val))
    steps_per_epoch = len(x_tr) // args.batch_size
    if steps_per_epoch == 0:
        raise CLIError(f"--batch-size {args.batch_size} is larger than the {len(x_tr)} training images; lower it")

    model, net = make_model(args, device)
    total_epochs = args.epochs + args.finetune_epochs
    start_epoch, step_in_epoch, history, best = 0, 0, [], -1.0
    running = torch.zeros(5, device=device)  # summed over the epoch: loss, ce, second term, adv correct, clean correct
    no_clean = torch.tensor(math.nan, device=device)  # --loss ce sees no clean logits: clean accuracy unmeasured

    opt = make_optimizer(model, args, finetune=False)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        start_epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        history, best = ckpt["metrics"]["history"], ckpt["metrics"]["best_val_robust"]
        opt = make_optimizer(model, args, ckpt["finetune"])
        opt.load_state_dict(ckpt["optimizer"])
        running = ckpt["running"].to(device)
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        print(f"resuming {args.out} at epoch {start_epoch + 1}, step {step_in_epoch}")

    def checkpoint(epoch, step):
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        # CPU copies: the file loads with a plain torch.load(path, weights_only=True) on any machine.
        return {"model": to_cpu(model.state_dict()), "optimizer": to_cpu(opt.state_dict()), "finetune": opt.finetune,
                "epoch": epoch, "step_in_epoch": step, "config": {"model": model.config, "train": run_config(args)},
                "device": device.type, "running": running.cpu(), "rng": rng,
                "metrics": {"history": history, "best_val_robust": best}}

    # Ctrl-C sets a flag that is read between steps, so the saved state is never half-updated; a second
    # Ctrl-C stops at once.
    stop = []
    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
        print("\nCtrl-C: saving after this step (Ctrl-C again to quit without saving)", flush=True)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    print(f"{args.loss} | {len(x_tr)} train / {len(x_val)} val images | {steps_per_epoch} steps of "
          f"{args.batch_size} | eps {args.eps:.4f} alpha {args.alpha:.4f} steps {args.steps} | {device}"
          f"{' bf16' if args.amp else ''}{' compiled' if args.compile else ''}")
    print(f"{'epoch':>5} {'loss':>7} {'ce':>7} {'second':>7} {'tr_clean':>8} {'tr_adv':>7} "
          f"{'val_clean':>9} {'val_pgd':>8} {'lr':>7} {'s':>6}")
    try:
        for epoch in range(start_epoch, total_epochs):
            finetune = epoch >= args.epochs
            if finetune and not opt.finetune:
                opt = make_optimizer(model, args, finetune=True)  # a fresh optimizer for the second stage
            stage_start, stage_epochs = (args.epochs, args.finetune_epochs) if finetune else (0, args.epochs)
            lr_of = lambda step: lr_at((epoch - stage_start) * steps_per_epoch + step, stage_epochs * steps_per_epoch, args.lr)
            bar = Progress(f"epoch {epoch + 1}/{total_epochs}", steps_per_epoch, args.batch_size, step_in_epoch)
            t0 = time.time()
            stream = batches(x_tr, y_tr, args.batch_size, shuffle_seed=args.seed * 100003 + epoch, augment=True,
                             drop_last=True)
            for step, (xb, yb) in enumerate(stream):
                if step < step_in_epoch:  # resuming mid-epoch: the same batches, already trained on
                    continue
                for group in opt.param_groups:
                    group["lr"] = lr_of(step)
                loss, parts, logits_adv, logits_clean = train_step(model, net, opt, xb, yb, args, finetune)
                with torch.no_grad():  # running sums stay on the device: no host sync per step
                    clean = (logits_clean.argmax(1) == yb).sum() if logits_clean is not None else no_clean
                    running += torch.stack([loss.detach() * len(yb), parts[0].detach() * len(yb),
                                            parts[1].detach() * len(yb), (logits_adv.argmax(1) == yb).sum(), clean])
                step_in_epoch = step + 1
                # The bar's occasional refresh is the moment to look at the loss (a host sync).
                if bar.update(step_in_epoch) and not torch.isfinite(running[0]):
                    break
                if stop:
                    break
            bar.close()
            sums = running.tolist()
            if not math.isfinite(sums[0]):
                raise CLIError(f"the loss became non-finite in epoch {epoch + 1}; nothing of this epoch was saved "
                               f"({args.out} keeps the last good epoch, if any). Lower --lr, or drop --amp")
            if stop and step_in_epoch < steps_per_epoch:
                save_atomic(checkpoint(epoch, step_in_epoch), args.out)
                print(f"interrupted: saved {args.out} at epoch {epoch + 1}, step {step_in_epoch}; "
                      f"continue with: python train.py --resume --out {args.out}")
                return 130
            n = steps_per_epoch * args.batch_size  # drop_last: every batch is full
            train_seconds = time.time() - t0
            val_clean, val_robust = evaluate(model, x_val, y_val, args)
            row = {"epoch": epoch + 1, "stage": "finetune" if finetune else "train", "loss": sums[0] / n,
                   "ce": sums[1] / n, "second": sums[2] / n, "train_clean": sums[4] / n, "train_adv": sums[3] / n,
                   "val_clean": val_clean, "val_pgd": val_robust, "lr": lr_of(steps_per_epoch - 1),
                   "train_s": train_seconds, "s": time.time() - t0}
            history.append(row)
            print(f"{row['epoch']:>5} {row['loss']:7.4f} {row['ce']:7.4f} {row['second']:7.4f} "
                  f"{row['train_clean']:8.4f} {row['train_adv']:7.4f} {val_clean:9.4f} {val_robust:8.4f} "
                  f"{row['lr']:7.4f} {row['s']:6.1f}", flush=True)
            running.zero_()
            step_in_epoch = 0
            is_best = len(x_val) == 0 or val_robust > best
            best = val_robust if len(x_val) and is_best else best
            state = checkpoint(epoch + 1, 0)
            if is_best:  # best first: the last checkpoint never names a best epoch that was not written
                save_atomic(state, files["best"])
            save_atomic(state, args.out)
            save_atomic_text("".join(json.dumps(json_safe(r)) + "\n" for r in history), files["log"])
            if stop:
                print(f"interrupted: saved {args.out} after epoch {epoch + 1}; "
                      f"continue with: python train.py --resume --out {args.out}")
                return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    if history:
        plot = {"loss": [(r["epoch"], r["loss"]) for r in history]}
        for key in ("train_clean", "train_adv", "val_clean", "val_pgd"):
            plot[key] = [(r["epoch"], r[key]) for r in history]
        svg_plot(files["svg"], plot, "epoch", f"{args.loss}: loss and accuracy")
    best_note = f"best val PGD {best:.4f}" if len(x_val) else "no --val slice: the last epoch"
    print(f"saved {args.out} (last), {files['best']} ({best_note}), {files['log']}, {files['svg']}")
    return 0


if __name__ == "__main__":
    cli(main, get_args, "train.py")
