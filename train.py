"""Adversarial training on CIFAR-10/100 with the ANCHOR loss (or a baseline), as users run it.

    python train.py --epochs 100 --eps 0.031                      # ANCHOR: PGD-AT + hard-mined SupCon
    python train.py --loss ce --epochs 30                         # Madry PGD-AT, the baseline
    python train.py --arch wrn-34-10 --dataset cifar100           # a WideResNet-34-10 on CIFAR-100
    python train.py --width 16 --limit 2000 --epochs 2 --device cpu --out quick.pt   # minutes on a CPU
    python train.py --resume --out ckpt.pt --data DIR             # continue after Ctrl-C (the command it prints)
    torchrun --nproc_per_node 8 train.py --epochs 100             # the same run on 8 GPUs (DDP)

Writes OUT (last epoch), OUT with .best.pt (best PGD accuracy on the held-out --val slice; adversarial
training overfits late), a JSON-lines log (.jsonl) and a plot of the curves (.svg) beside it.
"""
import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import time
from types import SimpleNamespace

import torch

import ddp
import resume
from anchor import feature_cosines, loss_diagnostics
from attacks import pgd
from cli import (CLIError, Parser, Progress, cli, eps_type, file_path, flag_names, json_safe, non_negative,
                 on_stop_signals, positive, resolve_device, save_atomic, save_atomic_text, seed_type, svg_plot)
from data import DATASETS, DataError, batches, load_dataset, split_train_val
from model import arch_key, build_model
from step import lr_at, make_optimizer, train_step, unused_flag

LOSSES = ("anchor", "supcon", "ce", "trades")
VAL_STEPS = 10  # the validation attack: PGD-10 at step eps/4 (evaluate)
FINETUNE_LR = 0.002  # the fine-tuning stage's peak, chosen on validation (results/cpu_finetune/README.md)


def parser():
    """The flags, each with a short help; docs/usage.md explains each in full."""
    p = Parser(description="Adversarial training on CIFAR-10/100 with the ANCHOR loss (docs/usage.md: every flag).",
               allow_abbrev=False)
    add = p.add_argument
    add("--data", type=str, default="./data", help="folder holding cifar-10-batches-py/ (downloaded there if missing)")
    add("--dataset", type=str, default="cifar10", choices=sorted(DATASETS), help="the data set")
    add("--limit", type=positive(int), default=None, help="train on the first N training images only")
    add("--val", type=non_negative(int), default=1000, help="the last N training images: validation, best checkpoint")
    add("--epochs", type=positive(int), default=30, help="training epochs")
    add("--finetune-epochs", type=non_negative(int), default=0,
        help="then K epochs of the classifier alone (CE on PGD examples, backbone frozen); the best is one of these")
    add("--batch-size", type=positive(int), default=512, help="images per step (over all processes under torchrun)")
    add("--lr", type=positive(float), default=0.2, help="peak SGD learning rate of the one-cycle schedule")
    add("--finetune-lr", type=positive(float), default=FINETUNE_LR,
        help="peak learning rate of the fine-tuning stage's own one-cycle schedule")
    add("--wd", type=non_negative(float), default=5e-4, help="weight decay")
    add("--eps", type=eps_type, default=8 / 255, help="L-inf radius in [0, 1] pixel units (0.031 or 8/255)")
    add("--alpha", type=positive(eps_type), default=None, help="PGD step, pixel units (default 2/255; trades 0.007)")
    add("--steps", type=positive(int), default=10, help="PGD steps of the training attack")
    add("--loss", type=str, default="anchor", choices=LOSSES,
        help="anchor: CE on PGD examples + lam * anchor_loss; supcon: beta 0; ce: PGD-AT; trades: TRADES")
    add("--temperature", type=positive(float), default=0.1, help="contrastive temperature (anchor, supcon)")
    add("--beta", type=non_negative(float), default=1.0, help="hard-positive mining strength (anchor)")
    add("--lam", type=non_negative(float), default=None,
        help="weight of the second term (default 1; trades 6); --loss anchor --lam 0: the BatchNorm-matched control")
    add("--adv-view", type=str, default="same", choices=("same", "second"),
        help="the adversarial view is made from the augmented image, or from a second augmentation of it")
    add("--seed", type=seed_type, default=0, help="random seed (init, data order, augmentation, PGD starts)")
    add("--device", type=str, default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    add("--amp", action="store_true", help="bf16 autocast for training (CUDA, or a CPU with native bf16)")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="NHWC memory layout (default: on CUDA; on the CPU from width 16, docs/speed.md)")
    add("--arch", type=str, default="resnet18", help="resnet18, preact-resnet18, wrn-34-10, wrn-28-10, wrn-DEPTH-WIDEN")
    add("--width", type=positive(int), default=64, help="base width of the ResNets (64: the standard model)")
    add("--sync-bn", action="store_true", help="torchrun on CUDA: BatchNorm statistics over the global batch")
    add("--out", type=file_path, default="ckpt.pt", help="checkpoint path; the log, plot and .best.pt go beside it")
    add("--resume", action="store_true", help="continue the run saved at --out")
    return p


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    # Which flags the user typed (not defaults): a flag the loss ignores is refused, and --resume refuses those
    # that contradict the checkpoint.
    typed = set(flag_names(sys.argv[1:] if argv is None else argv))
    args.explicit = {a.dest for a in p._actions if typed & set(a.option_strings)}
    flag = unused_flag(args.loss, args.explicit)
    if flag:
        hint = "; TRADES's beta is --lam (default 6)" if (args.loss, flag) == ("trades", "--beta") else ""
        p.error(f"argument {flag}: --loss {args.loss} does not use it{hint}; drop the flag")
    if args.lam is None:
        args.lam = 6.0 if args.loss == "trades" else 1.0
    if args.alpha is None:
        args.alpha = 0.007 if args.loss == "trades" else 2 / 255
    try:
        is_wrn = arch_key(args.arch) == "wrn-D-K"
    except ValueError as e:
        p.error(f"argument --arch: {str(e).removeprefix('model config: ')}")
    resolve_device(p, args)
    if args.channels_last is None:  # the faster layout that is safe for the model (see --help)
        args.channels_last = args.device == "cuda" or is_wrn or args.width >= 16
    if "finetune_lr" in args.explicit and not args.finetune_epochs:
        p.error("argument --finetune-lr: there is no fine-tuning stage to use it; add --finetune-epochs K")
    if is_wrn and "width" in args.explicit:
        p.error(f"argument --width: {args.arch}'s name gives its widths (wrn-DEPTH-WIDEN); drop --width")
    return args


def make_model(args, device):
    """(model, net): the network on `device`, and what the training step calls (torch.compile'd with --compile)."""
    spec = DATASETS[args.dataset]
    width = None if arch_key(args.arch) == "wrn-D-K" else args.width  # a WRN's name gives its widths
    model = build_model({"arch": args.arch, "width": width, "num_classes": spec.num_classes,
                         "mean": list(spec.mean), "std": list(spec.std)}).to(device)
    if args.sync_bn:  # torchrun on CUDA: BatchNorm statistics over all processes (same parameters and keys)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Static shapes: the attack's batch B and the update's (2B for anchor and supcon) get a graph each, where
    # dynamo would otherwise recompile the second size as a dynamic-shape graph.
    return model, torch.compile(model, dynamic=False) if args.compile else model


def evaluate(model, x, y, args, batch_size=500, keep=None):
    """Correct counts [clean, PGD] on a uint8 set, as a device tensor: PGD-10 at --eps with step eps/4 (2/255 at
    the default eps) from a uniform start, whatever the training attack's --steps and --alpha, so that runs with
    other training attacks are ranked with one ruler; eval mode. An image counts as robust only if its clean
    version is right too, as eval.py (AutoAttack) counts, so robust never exceeds clean. float32: TF32 is off
    here even where cuDNN would use it (Ampere and later). `keep`, a list, receives the PGD images batch by batch."""
    model.eval()
    correct = torch.zeros(2, device=x.device)
    with fp32_exact():
        for xb, yb in batches(x, y, batch_size):
            x_adv = pgd(model, xb, yb, args.eps, max(args.eps / 4, 1e-6), VAL_STEPS)
            if keep is not None:
                keep.append(x_adv)
            with torch.no_grad():
                right = model(xb).argmax(1) == yb
                correct += torch.stack([right.sum(), (right & (model(x_adv).argmax(1) == yb)).sum()])
    return correct


def diagnose(model, x, x_adv, y, args):
    """What the contrastive term has learned, on the validation slice (eval mode, no augmentation) and its PGD
    images: anchor.loss_diagnostics over whole chunks of --batch-size images, as many as a training batch, so that
    its reference values are those of the logged term (supcon's with beta 0; ce and trades get anchor's t and
    beta), averaged over the chunks; and the backbone's cosines (anchor.feature_cosines) over the first 1,000 of
    those images. A slice smaller than a batch (this rank's, under torchrun) is one smaller chunk: "con_batch"
    says how many images a chunk held. A dict of floats."""
    model.eval()
    size = min(args.batch_size, len(x))
    beta = 0.0 if args.loss == "supcon" else args.beta
    parts, backbone = [], {"clean": [], "adv": []}
    with torch.no_grad(), fp32_exact():
        for (xb, yb), xa in zip(batches(x, y, size, drop_last=True), x_adv.split(size)):
            h = {"clean": model.features(xb), "adv": model.features(xa)}  # (size, d) each
            views = torch.stack([model.head(h["clean"]), model.head(h["adv"])], dim=1)  # (size, 2, proj_dim)
            parts.append(loss_diagnostics(views, yb, args.temperature, beta))
            for k in h:
                backbone[k].append(h[k])
    row = {f"con_{k}" if k in ("loss", "uniform", "collapse", "covered") else k: sum(p[k] for p in parts) / len(parts)
           for k in parts[0]}
    n = min(len(parts) * size, 1000)  # (n, n) similarities: bounded
    cos = feature_cosines(torch.cat(backbone["clean"])[:n], torch.cat(backbone["adv"])[:n], y[:n])
    return {**row, "con_batch": size, **{f"backbone_{k}": v for k, v in cos.items()}}


@contextlib.contextmanager
def fp32_exact():
    """TF32 off for convolutions and matmuls (a no-op on the CPU), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------- the run: set-up, epoch, end of epoch


def training_data(args, download):
    """(x_train, y_train, x_val, y_val) as --data, --limit and --val select them; CLIError when they cannot."""
    x_train, y_train, _, _ = load_dataset(args.dataset, args.data, download=download)
    x_tr, y_tr, x_val, y_val = split_train_val(x_train, y_train, args.val, args.limit)
    if len(x_tr) < args.batch_size:
        raise CLIError(f"--batch-size {args.batch_size} is larger than the {len(x_tr)} training images; lower it")
    return x_tr, y_tr, x_val, y_val


def set_up(args, ckpt, rank, world):
    """Data, model, optimizer and counters of a new or resumed run, as one namespace the other steps share."""
    device = ddp.local_device(args.device, world)
    torch.manual_seed(args.seed + rank)  # rank 0 draws as one process does; DDP gives every rank its weights
    x_tr, y_tr, x_val, y_val = training_data(args, download=world == 1)  # else fetched in main
    n_val = len(x_val)
    x_val, y_val = x_val.tensor_split(world)[rank], y_val.tensor_split(world)[rank]  # validation split over ranks
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model, net = make_model(args, device)
    run = SimpleNamespace(
        rank=rank, world=world, device=device, model=model, net=net, files=resume.paths(args.out),
        x_tr=x_tr.to(device), y_tr=y_tr.to(device), x_val=x_val.to(device), y_val=y_val.to(device), n_val=n_val,
        steps_per_epoch=len(x_tr) // args.batch_size, epoch=0, step=0, history=[], best=-1.0,
        running=torch.zeros(5, device=device),  # summed over the epoch: loss, ce, second term, adv and clean correct
        no_clean=torch.tensor(math.nan, device=device))  # --loss ce sees no clean logits: clean accuracy unmeasured
    run.opt = make_optimizer(model, args, finetune=False)
    if ckpt is not None:
        resume.restore(run, args, ckpt)
    return run


def train_epoch(run, args, epoch, stop):
    """Train one epoch (its rest, when resuming mid-epoch). Returns False when a signal or a non-finite loss
    ended it before its last step."""
    finetune = epoch >= args.epochs
    if finetune and not run.opt.finetune:
        run.opt = make_optimizer(run.model, args, finetune=True)  # a fresh optimizer for the second stage
        run.train_net = ddp.wrap(run.model, run.net, run.device, run.world, args.compile)
    stage_start, stage_epochs = (args.epochs, args.finetune_epochs) if finetune else (0, args.epochs)
    total = args.epochs + args.finetune_epochs
    bar = Progress(f"epoch {epoch + 1}/{total}", run.steps_per_epoch, args.batch_size, run.step)
    second_view = args.adv_view == "second" and not finetune
    stream = batches(run.x_tr, run.y_tr, args.batch_size, shuffle_seed=args.seed * 100003 + epoch, augment=True,
                     drop_last=True, second_view=second_view)
    share = args.batch_size // run.world  # every rank draws the same global batch and trains on its slice
    leave = ddp.Leave(run.world)
    for step, batch in enumerate(stream):
        if step < run.step:  # resuming mid-epoch: the same batches, already trained on
            continue
        mine = [b[run.rank * share:(run.rank + 1) * share] for b in batch]  # xb, yb and, with a second view, xb2
        xb, yb, xb2 = (*mine, None)[:3]
        for group in run.opt.param_groups:
            group["lr"] = lr_at((epoch - stage_start) * run.steps_per_epoch + step, stage_epochs * run.steps_per_epoch,
                                args.finetune_lr if finetune else args.lr)
        loss, parts, logits_adv, logits_clean = train_step(run.model, run.net, run.opt, xb, yb, args, finetune,
                                                           run.train_net, xb2)
        with torch.no_grad():  # running sums stay on the device: no host sync per step
            clean = (logits_clean.argmax(1) == yb).sum() if logits_clean is not None else run.no_clean
            run.running += torch.stack([loss.detach() * len(yb), parts[0].detach() * len(yb),
                                        parts[1].detach() * len(yb), (logits_adv.argmax(1) == yb).sum(), clean])
        run.step = step + 1
        if leave(stop, run.running[0], refreshed=bar.update(run.step)):  # a signal, or the loss became non-finite
            break
    bar.close()
    return run.step == run.steps_per_epoch


def end_epoch(run, args, epoch, sums, seconds):
    """Validate, print and log the epoch's row, and write the checkpoints (best first)."""
    t0 = time.time()
    ddp.share_buffers(run.model, run.world)  # validate and save rank 0's model
    x_adv = []
    counts = ddp.all_sum(evaluate(run.model, run.x_val, run.y_val, args, keep=x_adv), run.world).tolist()
    val_clean, val_robust = (c / run.n_val if run.n_val else math.nan for c in counts)
    # this rank's slice (rank 0's is logged): the contrastive term's range covered, the twin's weight, cosines
    mechanism = diagnose(run.model, run.x_val, torch.cat(x_adv), run.y_val, args) if x_adv else {}
    n = run.steps_per_epoch * args.batch_size  # drop_last: every batch is full
    lr = run.opt.param_groups[0]["lr"]
    row = {"epoch": epoch + 1, "stage": "finetune" if run.opt.finetune else "train", "loss": sums[0] / n,
           "ce": sums[1] / n, "second": sums[2] / n, "train_clean": sums[4] / n, "train_adv": sums[3] / n,
           "val_clean": val_clean, "val_pgd": val_robust, "lr": lr, "train_s": seconds,
           "s": seconds + time.time() - t0, **mechanism}
    run.history.append(row)
    print(f"{row['epoch']:>5} {row['loss']:7.4f} {row['ce']:7.4f} {row['second']:7.4f} {row['train_clean']:8.4f} "
          f"{row['train_adv']:7.4f} {val_clean:9.4f} {val_robust:8.4f} {row.get('con_covered', math.nan):7.3f} "
          f"{lr:7.4f} {row['s']:6.1f}", flush=True)
    run.running.zero_()
    run.step = 0
    if run.opt.finetune and epoch == args.epochs:  # the fine-tuning stage is the method: its best is the best
        run.best = -1.0
    is_best = run.n_val == 0 or val_robust > run.best
    run.best = val_robust if run.n_val and is_best else run.best
    state = resume.checkpoint(run, args, epoch + 1, 0)
    if run.rank == 0:
        if is_best:  # best first: the last checkpoint never names a best epoch that was not written
            save_atomic(state, run.files["best"])
        save_atomic(state, args.out)
        save_atomic_text("".join(json.dumps(json_safe(r)) + "\n" for r in run.history), run.files["log"])


@contextlib.contextmanager
def stop_on_signal(out):
    """Ctrl-C or SIGTERM (how `kill` and clusters stop a job; torchrun passes either on to every process) sets a
    flag read between steps, so the saved state is never half-updated; a second signal stops at once, unsaved."""
    stop = []

    def handler(signum, frame):
        if stop:  # cli() prints the message as one line, without a traceback, and exits 130
            kept = f"{out} keeps the last saved state" if os.path.exists(out) else f"nothing was saved to {out}"
            again = KeyboardInterrupt(f"interrupted again: stopped without saving; {kept}")
            again.signum = signum  # cli() exits 128 + this signal's number
            raise again
        stop.append(signum)
        print(f"\n{signal.Signals(signum).name}: saving after this step (Ctrl-C again to quit without saving)",
              flush=True)

    with on_stop_signals(handler):
        yield stop


def resume_command(args, world):
    """The command that continues this run. --resume restores every flag that shapes the result from the
    checkpoint, but not the runtime ones: --data (which need not be ./data) and those that were switched on."""
    launch = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    switched = "".join(f" --{k.replace('_', '-')}" for k in ("compile", "sync_bn") if getattr(args, k))
    return f"{launch} train.py --resume --out {shlex.quote(args.out)} --data {shlex.quote(args.data)}{switched}"


def train(run, args):
    """The epochs, from set-up to the last checkpoint and plot; 0, or 128 + signal when a signal stopped it."""
    print(f"{args.loss} | {args.dataset} {run.model.config['arch']} | {len(run.x_tr)} train / {run.n_val} val "
          f"images | {run.steps_per_epoch} steps of {args.batch_size} | eps {args.eps:.4f} alpha {args.alpha:.4f} "
          f"steps {args.steps} | {run.device}{f' x {run.world} processes' if run.world > 1 else ''}"
          f"{' bf16' if args.amp else ''}{' compiled' if args.compile else ''}")
    print(f"{'epoch':>5} {'loss':>7} {'ce':>7} {'second':>7} {'tr_clean':>8} {'tr_adv':>7} "
          f"{'val_clean':>9} {'val_pgd':>8} {'covered':>7} {'lr':>7} {'s':>6}")
    with stop_on_signal(args.out) as stop:
        for epoch in range(run.epoch, args.epochs + args.finetune_epochs):
            t0 = time.time()
            finished = train_epoch(run, args, epoch, stop)
            sums = ddp.all_sum(run.running, run.world).tolist()  # in place: every rank holds the global sums from here
            if not math.isfinite(sums[0]):
                raise CLIError(f"the loss became non-finite in epoch {epoch + 1}; nothing of this epoch was saved "
                               f"({args.out} keeps the last good epoch, if any). Lower --lr, or drop --amp")
            if finished:
                end_epoch(run, args, epoch, sums, time.time() - t0)
            else:
                state = resume.checkpoint(run, args, epoch, run.step)
                if run.rank == 0:
                    save_atomic(state, args.out)
            if not finished or ddp.any_rank(stop, run.world, run.device):
                where = f"at epoch {epoch + 1}, step {run.step}" if not finished else f"after epoch {epoch + 1}"
                print(f"interrupted: saved {args.out} {where}; continue with: {resume_command(args, run.world)}")
                return 128 + (stop[0] if stop else signal.SIGTERM)
    if run.history and run.rank == 0:
        plot = {"loss": [(r["epoch"], r["loss"]) for r in run.history]}
        for key in ("train_clean", "train_adv", "val_clean", "val_pgd"):
            plot[key] = [(r["epoch"], r[key]) for r in run.history]
        svg_plot(run.files["svg"], plot, "epoch", f"{args.loss}: loss and accuracy")
    best_note = f"best val PGD {run.best:.4f}" if run.n_val else "no --val slice: the last epoch"
    print(f"saved {args.out} (last), {run.files['best']} ({best_note}), {run.files['log']}, {run.files['svg']}")
    return 0


def main(args):
    ckpt = resume.read_run(args)
    rank, world = ddp.start(args.device, args.batch_size, args.sync_bn)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN's autotuned kernels pay (CUDA only)
    user_errors = (CLIError, DataError, OSError)
    try:
        total = args.epochs + args.finetune_epochs
        if ckpt is not None and ckpt["epoch"] >= total:  # nothing left to train: say so, and rewrite no file
            print(f"{args.out} is a finished run (epoch {ckpt['epoch']} of {total}): nothing to resume, no file "
                  "changed. To train longer, start a new run with a new --out (and more --epochs)")
            return 0
        if world > 1:  # rank 0 fetches a missing data set before the others read it
            ddp.agreed(lambda: rank == 0 and load_dataset(args.dataset, args.data, download=True), world, user_errors)
        run = ddp.agreed(lambda: set_up(args, ckpt, rank, world), world, user_errors)  # no collective inside
        # a collective: once every rank's set-up succeeded
        run.train_net = ddp.wrap(run.model, run.net, run.device, world, args.compile)
        resume.restore_rank_buffers(run.model, ckpt, rank)  # after the wrap, which gave every rank rank 0's
        return train(run, args)
    except RuntimeError as e:
        if ddp.peer_failed(e, world):
            raise CLIError(f"another process stopped (its message is above); {args.out} keeps the last saved state")
        raise
    finally:
        run = None  # the DDP wrapper goes before its process group (see ddp.stop)
        ddp.stop()


if __name__ == "__main__":
    cli(main, get_args, "train.py")
