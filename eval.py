"""Robustness of a model under L-inf attacks, with checks for the classic evaluation mistakes: from the command
line for a checkpoint of train.py (CIFAR-10 or -100), or from Python for any model.

    python eval.py ckpt.pt                                    # clean, FGSM, PGD-20, CW-inf, AutoAttack, worst
    python eval.py ckpt.pt --n 1000 --attacks pgd20,apgd-t --json out.json   # a fixed 1000-image subset
    python eval.py ckpt.pt --attacks square                   # the black-box Square attack alone
    python eval.py ckpt.pt --attacks cw_l2                    # L2 C&W: success rate and median L2 norm
    python eval.py ckpt.pt --eps-sweep                        # PGD-20 accuracy over eps, drawn as an SVG

    from eval import robustness
    report = robustness(model, x_test, y_test)                # any nn.Module: images in [0, 1] -> logits

L-inf attacks at eps (default 8/255) in [0, 1] pixel space, model in eval mode. Every attack runs on the images
classified correctly without attack; the others count as not robust (AutoAttack's convention), so no attack
scores above clean. "worst" counts an image as robust only if it survives every attack that ran. "autoattack"
is AutoAttack's cascade without FAB-T: APGD-CE, then APGD-T, then Square (5,000 queries), each on the images all
earlier stages left robust.
"""
import argparse
import collections
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from anchor import feature_cosines
from attacks import apgd, check_batch, cw_l2, fgsm, pgd, square
from cli import (Parser, Progress, cli, eps_type, json_safe, new_file_path, positive, resolve_device, save_atomic_text,
                 seed_type, svg_plot)
from data import load_dataset
from resume import load_checkpoint, model_from_checkpoint

# name -> (attack at (eps, alpha, seed), model calls per image at most: for the progress line's ETA). The
# L-inf attacks in the order of the report; "autoattack" is the cascade of AUTOATTACK.
ATTACKS = {
    "clean": (lambda m, x, y, eps, alpha, seed: x, 1),
    "fgsm": (lambda m, x, y, eps, alpha, seed: fgsm(m, x, y, eps), 2),
    "pgd20": (lambda m, x, y, eps, alpha, seed: pgd(m, x, y, eps, alpha, 20), 21),
    "cw_inf": (lambda m, x, y, eps, alpha, seed: pgd(m, x, y, eps, alpha, 30, loss="cw"), 31),
    "apgd_ce": (lambda m, x, y, eps, alpha, seed: apgd(m, x, y, eps, 100, loss="ce", seed=seed), 103),
    "apgd_t": (lambda m, x, y, eps, alpha, seed: apgd(m, x, y, eps, 100, loss="dlr", targeted=True, seed=seed), 911),
    "square": (lambda m, x, y, eps, alpha, seed: square(m, x, y, eps, 5000, seed=seed), 5002),
}
AUTOATTACK = ["apgd_ce", "apgd_t", "square"]  # AutoAttack's "standard" version less FAB-T, in its order
# (weaker, stronger) pairs where the second must not score higher: the same loss, a stronger optimizer.
NESTED = [("fgsm", "pgd20"), ("pgd20", "apgd_ce")]
DEFAULT_ATTACKS = ("clean", "fgsm", "pgd20", "cw_inf", "autoattack")
LINF_NAMES = list(ATTACKS) + ["autoattack"]  # the order of the report
ALL_NAMES = LINF_NAMES + ["cw_l2"]
SWEEP_EPS = [0, 1, 2, 4, 8, 12, 16, 32]  # in 1/255 units
# What every step of an evaluation shares; progress: print the report as it goes.
Settings = collections.namedtuple("Settings", "eps alpha batch_size seed progress")


def attack_names(names):
    """A list of attack names (hyphens accepted for underscores), or ValueError naming the unknown one."""
    names = [n.strip().replace("-", "_") for n in names if n.strip()]
    unknown = [n for n in names if n not in ALL_NAMES]
    if unknown or not names:
        what = unknown[0] if unknown else "list (empty)"
        raise ValueError(f"unknown attack {what}; choose from {','.join(ALL_NAMES)}")
    return names


def attack_list(text):  # the argparse type of --attacks
    try:
        return attack_names(text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args(argv=None):
    p = Parser(description="Evaluate a checkpoint's clean and adversarial accuracy on the test set of the data set "
                        "it was trained on (CIFAR-10 or CIFAR-100).", allow_abbrev=False)
    p.add_argument("ckpt", type=str, help="checkpoint written by train.py")
    p.add_argument("--data", type=str, default="./data",
                   help="folder holding cifar-10-batches-py/ or cifar-100-python/ (downloaded there when missing)")
    p.add_argument("--n", type=positive(int), default=10000,
                   help="evaluate N test images (a fixed subset spread over the test set; all 10000 by default)")
    p.add_argument("--attacks", type=attack_list, default=list(DEFAULT_ATTACKS),
                   help=f"comma-separated subset of {','.join(ALL_NAMES)}; autoattack is AutoAttack's standard "
                   "cascade (APGD-CE, APGD-T, Square with 5,000 queries) less FAB-T, which in AutoAttack's published "
                   "logs breaks a few images in thousands after the APGD stages (see docs/usage.md)")
    p.add_argument("--eps", type=eps_type, default=8 / 255, help="L-inf radius in [0, 1] pixel units (0.031 or 8/255)")
    p.add_argument("--alpha", type=positive(eps_type), default=2 / 255, help="PGD and CW-inf step size, pixel units")
    p.add_argument("--batch-size", type=positive(int), default=500, help="images per attack batch")
    p.add_argument("--json", type=new_file_path, default=None, help="write the numbers to this JSON file")
    p.add_argument("--device", type=str, default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--amp", action="store_true", help="bf16 autocast; the default is float32")
    p.add_argument("--eps-sweep", action="store_true",
                   help="also PGD-20 accuracy at eps = 0..32/255, drawn as an SVG beside the checkpoint (or JSON)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the attacks' random starts")
    args = p.parse_args(argv)
    if args.json and os.path.abspath(args.json) == os.path.abspath(args.ckpt):
        p.error(f"argument --json: {args.json} is the checkpoint; name another file")
    resolve_device(p, args)
    return args


def spread(n, k, device):
    """min(n, k) indices spread evenly over range(n): a diagnostic on them sees every class of an input stored
    sorted by class (the JPEG copy's test set is), where the first k would see one class."""
    return torch.linspace(0, n - 1, min(n, k), device=device).round().long()


def check_inputs(model, x, y, batch_size):
    """ValueError naming the bad argument and the fix; else the number of classes the model outputs (one forward
    pass, on the first batch)."""
    if not isinstance(batch_size, int) or batch_size < 1 or not x.is_floating_point() or len(x) == 0:
        raise ValueError(f"x must be float images [N, C, H, W] in [0, 1], N >= 1, and batch_size an int >= 1; got "
                         f"{x.dtype} {list(x.shape)}, {batch_size!r} (uint8 images: pass x.float() / 255)")
    check_batch(x, y)  # attacks.py's checks: x [N, C, H, W] in [0, 1], y int64 [N]
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if y.device != x.device or (param is not None and param.device != x.device):
        where = param.device if param is not None else "?"
        raise ValueError(f"x is on {x.device}, y on {y.device} and the model on {where}: move them to one device")
    with torch.no_grad():
        logits = model(x[:batch_size])
    if not isinstance(logits, torch.Tensor) or logits.shape[:1] != x[:batch_size].shape[:1] or logits.dim() != 2:
        raise ValueError(f"the model must return logits [N, classes], got {type(logits).__name__} "
                         f"{list(getattr(logits, 'shape', []))}: return the logits alone")
    classes = logits.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"y holds labels {y.min().item()}..{y.max().item()} but the model outputs {classes} classes: "
                         f"labels must be class indices 0..{classes - 1}")
    return classes


def robustness(model, x, y, attacks=DEFAULT_ATTACKS, eps=8 / 255, alpha=2 / 255, batch_size=500, seed=0,
               progress=True, features=None):
    """Accuracy of any model (images x float [N, C, H, W] in [0, 1] -> logits [N, K]; labels y int64 [N], on the
    model's device) under L-inf attacks: what `python eval.py` measures, as a dict.

    attacks: names from ALL_NAMES, or one comma-separated string. eps, alpha: pixel units. seed: the random starts.
    progress: print the report as it goes. features: images -> [N, D] for the representation report (default
    model.features; no report without one). For bf16, call it under torch.autocast. Returns {"n", "eps", "alpha",
    "seed", "accuracy": {attack: a, "worst": a}, "per_class": {attack: [a of class 0, 1, ...]} (NaN: no images),
    "warnings": [str], and where they ran "autoattack_stages", "cw_l2", "representation"}. Every module's
    train/eval mode, the gradients and the global random state are left as found; bad input: ValueError.
    """
    attacks = attack_names(attacks.split(",") if isinstance(attacks, str) else attacks)
    opts = Settings(float(eps), float(alpha), batch_size, seed, progress)
    features = features if features is not None else getattr(model, "features", None)
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    try:
        for m, _ in modes:
            m.training = False
        classes = check_inputs(model, x, y, batch_size)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            return evaluate(model, x, y, classes, attacks, opts, features)
    finally:
        for m, training in modes:  # each module's own flag: a model partly in eval mode stays so
            m.training = training


def evaluate(model, x, y, classes, attacks, opts, features):
    """robustness's work, the model in eval mode and its inputs checked."""
    say = print if opts.progress else lambda *a, **k: None
    result = {"n": len(x), "eps": opts.eps, "alpha": opts.alpha, "seed": opts.seed, "accuracy": {}, "per_class": {}}
    say(f"{'attack':<8} {'accuracy':>9} {'seconds':>8}")
    correct, after = {}, None
    clean = run_attack(model, x, y, "clean", opts)  # the images every attack starts from
    for name in [a for a in LINF_NAMES if a in attacks]:
        torch.manual_seed(opts.seed)  # each attack's random start is reproducible on its own
        t0 = time.time()
        if name == "clean":
            correct[name] = clean
        elif name == "autoattack":
            after = autoattack(model, x, y, clean, opts)
            correct[name] = after[AUTOATTACK[-1]]
            result["autoattack_stages"] = {k: v.float().mean().item() for k, v in after.items()}
        else:
            correct[name] = attack_robust(model, x, y, clean, name, opts, label=name)
        result["accuracy"][name] = correct[name].float().mean().item()
        say(f"{name:<8} {result['accuracy'][name]:9.4f} {time.time() - t0:8.1f}", flush=True)
    if correct:
        correct["worst"] = torch.stack(list(correct.values())).all(0)
        result["accuracy"]["worst"] = correct["worst"].float().mean().item()
        counts = torch.bincount(y, minlength=classes)  # (K,) images per class
        for name, robust in correct.items():  # 0 / 0 = NaN for a class without images
            result["per_class"][name] = (torch.bincount(y, robust.double(), minlength=classes) / counts).tolist()
        by_class = {k: a for k, a in enumerate(result["per_class"]["worst"]) if not math.isnan(a)}
        weak, strong = min(by_class, key=by_class.get), max(by_class, key=by_class.get)
        say(f"{'worst':<8} {result['accuracy']['worst']:9.4f}   weakest class {weak} ({by_class[weak]:.4f}), "
            f"strongest class {strong} ({by_class[strong]:.4f})")
    if "cw_l2" in attacks:
        result["cw_l2"] = cw_l2_report(model, x, y, opts)
    if features is not None:
        some = spread(len(x), 250, x.device)  # 250 images: ample for mean cosines
        r = result["representation"] = representation_report(model, features, x[some], y[some], opts)
        say(f"features: clean-vs-PGD cos {r['clean_adv_cos']:.4f} | intra-class cos {r['intra_class_cos']:.4f} | "
            f"inter-class cos {r['inter_class_cos']:.4f}")
    if after is not None:  # what Square broke in the cascade, APGD-CE and APGD-T had both left robust
        square_only = after["apgd_t"] & ~after["square"]
    elif {"apgd_ce", "apgd_t", "square"} <= set(correct):
        square_only = correct["apgd_ce"] & correct["apgd_t"] & ~correct["square"]
    else:
        square_only = torch.zeros(0)
    result["warnings"] = sanity_checks(model, x, y, result["accuracy"], opts, int(square_only.sum()))
    for w in result["warnings"]:
        say(f"warning: {w}")
    return result


def run_attack(model, x, y, name, opts, label=None):
    """Per-example correctness [N] (bool) under one L-inf attack, batch by batch; adversarials not kept.

    With a label (and opts.progress), a live progress line: images done, robust so far, elapsed time and ETA.
    Inside a batch the images done are estimated from the model calls the attack has made, and the robust count
    is an upper bound: the images the attack still queries (Square and APGD stop querying the ones they fooled)."""
    attack, calls_per_image = ATTACKS[name]
    bar = Progress(label, len(x)) if label and opts.progress else None
    correct, done, robust = [], 0, 0
    for xb, yb in zip(x.split(opts.batch_size), y.split(opts.batch_size)):
        calls = 0

        def watched(inputs):  # the model, moving the progress line at each call
            nonlocal calls
            calls += 1
            bar.update(done + len(xb) * min(calls / calls_per_image, 1),
                       f"robust <= {robust + len(inputs)}/{done + len(xb)}")
            return model(inputs)

        x_adv = attack(watched if bar else model, xb, yb, opts.eps, opts.alpha, opts.seed)
        with torch.no_grad():
            correct.append(model(x_adv).argmax(1) == yb)
        done, robust = done + len(xb), robust + int(correct[-1].sum())
    if bar:
        bar.close()
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool, device=x.device)


def attack_robust(model, x, y, robust, name, opts, label=None):
    """Per-example robustness [N] after attacking, with `name`, only the images `robust` marks; the others stay
    not robust. Every attack starts from the images classified correctly (AutoAttack's convention): a mistake
    without attack is never attacked, nor counted robust where a random start happens to land on the right class."""
    todo, robust = robust.nonzero().squeeze(1), robust.clone()  # (M,) the images still robust
    robust[todo] = run_attack(model, x[todo], y[todo], name, opts, label)
    return robust


def autoattack(model, x, y, robust, opts):
    """AutoAttack's cascade from `robust` (the clean-correct images): APGD-CE, APGD-T and Square in turn, each on
    the images every earlier stage left robust. -> {stage: per-image robustness [N] after it}, printed as it goes."""
    after = {}
    for i, name in enumerate(AUTOATTACK):
        t0 = time.time()
        torch.manual_seed(opts.seed)
        robust = after[name] = attack_robust(model, x, y, robust, name, opts, f"autoattack {name}")
        if opts.progress:
            print(f"  {name:<8} {robust.float().mean().item():7.4f} {time.time() - t0:8.1f}   robust after "
                  f"{' + '.join(AUTOATTACK[:i + 1])}", flush=True)
    return after


def cw_l2_report(model, x, y, opts):
    """L2 Carlini-Wagner on the correctly classified images: success rate and median L2 norm of the successes."""
    t0, fooled, norms = time.time(), [], []
    for xb, yb in zip(x.split(opts.batch_size), y.split(opts.batch_size)):
        with torch.no_grad():
            right = model(xb).argmax(1) == yb
        x_adv = cw_l2(model, xb, yb)
        with torch.no_grad():
            success = right & (model(x_adv).argmax(1) != yb)
        fooled.append(success[right])
        norms.append((x_adv - xb).flatten(1).norm(dim=1)[success])
    fooled, norms = torch.cat(fooled), torch.cat(norms)
    report = {"attacked": len(fooled),  # the correctly classified images
              "success_rate": fooled.float().mean().item() if len(fooled) else math.nan,
              "median_l2": norms.median().item() if len(norms) else math.nan}
    if opts.progress:
        print(f"cw_l2    success {report['success_rate']:.4f} on correctly classified images, "
              f"median L2 {report['median_l2']:.4f} ({time.time() - t0:.1f} s)")
    return report


def sanity_checks(model, x, y, acc, opts, square_only=0):
    """Warnings for the classic evaluation mistakes (an input of one class among them) and signs of gradient
    masking. acc: {attack: accuracy}; square_only: how many images the black-box Square broke that APGD-CE and
    APGD-T both left robust."""
    warn = []
    labels = y.unique()
    if len(labels) == 1:  # e.g. the first images of a test set stored sorted by class
        warn.append(f"every image is of class {labels.item()}: the per-class figures (weakest and strongest class) and "
                    "the class-spread diagnostics (intra- and inter-class cosines) say nothing; pass a subset spread "
                    "over the classes")
    some = spread(len(x), opts.batch_size, x.device)  # images of every class, not the first batch
    xb, yb = x[some], y[some]
    with torch.no_grad():
        out1, out2 = model(xb), model(xb)
    if not torch.equal(out1, out2):
        warn.append("the model's outputs differ between two identical calls (randomness, or train mode): "
                    "attacks on a moving target overstate robustness")
    if out1.min() >= 0 and out1.max() <= 1 and torch.allclose(out1.sum(1), torch.ones_like(out1[:, 0]), atol=1e-3):
        warn.append("the model outputs probabilities, not logits: softmax saturation masks gradients; return logits")
    x_req = xb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x_req), yb, reduction="sum"), x_req)
    zero = (grad.flatten(1).abs().sum(1) == 0).float().mean().item()
    if zero > 0.1:
        warn.append(f"{zero:.0%} of images have an exactly zero input gradient: gradient masking makes "
                    "gradient attacks fail; trust only gradient-free or adaptive attacks")
    some, at_zero = spread(len(x), 100, x.device), opts._replace(eps=0.0, progress=False)  # 100 show a clamping bug
    pgd_at_zero = run_attack(model, x[some], y[some], "pgd20", at_zero).float().mean().item()
    clean_n0 = run_attack(model, x[some], y[some], "clean", at_zero).float().mean().item()
    if pgd_at_zero != clean_n0:
        warn.append(f"PGD at eps 0 gives {pgd_at_zero:.4f}, clean gives {clean_n0:.4f}: the attack changes images "
                    "it must not (check clamping and the [0, 1] convention)")
    tolerance = max(0.01, 3 / len(x))  # noise between random starts: 1% of the images, at least 3
    for weak, strong in NESTED:
        if weak in acc and strong in acc and acc[strong] > acc[weak] + tolerance:
            warn.append(f"{strong} ({acc[strong]:.4f}) scores higher than the weaker {weak} ({acc[weak]:.4f}): "
                        "a sign of gradient masking or a broken attack")
    if square_only > max(2, 0.002 * len(x)):  # on models without masking Square adds a few images in 10,000
        warn.append(f"Square (black-box) broke {square_only} images ({square_only / len(x):.2%}) that APGD-CE and "
                    "APGD-T both left robust: the gradients look masked; trust AutoAttack, not gradient attacks alone")
    return warn


def representation_report(model, features, x, y, opts):
    """Cosines in feature space (for this project's models the backbone's, what the classifier sees): clean vs
    PGD-20 version of the same image, and between different images of the same class and of different classes."""
    feats_clean, feats_adv = [], []
    for xb, yb in zip(x.split(opts.batch_size), y.split(opts.batch_size)):
        x_adv = pgd(model, xb, yb, opts.eps, opts.alpha, 20)
        with torch.no_grad():  # a feature map [B, C, H, W] counts as one vector per image (feature_cosines)
            feats_clean.append(features(xb).float())
            feats_adv.append(features(x_adv).float())
    cos = feature_cosines(torch.cat(feats_clean), torch.cat(feats_adv), y)
    return {"clean_adv_cos": cos["twin"], "intra_class_cos": cos["intra"], "inter_class_cos": cos["inter"]}


def eps_sweep(model, x, y, args):
    """[[eps, PGD-20 accuracy (step eps/4)]] over SWEEP_EPS, drawn as an SVG beside the JSON or the checkpoint."""
    sweep, opts = [], Settings(0.0, 1.0, args.batch_size, args.seed, False)
    clean = run_attack(model, x, y, "clean", opts)
    for k in SWEEP_EPS:
        torch.manual_seed(args.seed)
        eps = k / 255
        acc = attack_robust(model, x, y, clean, "pgd20", opts._replace(eps=eps, alpha=max(eps / 4, 1e-6)))
        sweep.append([eps, acc.float().mean().item()])
        print(f"eps {k:>2}/255  PGD-20 (step eps/4) {sweep[-1][1]:.4f}", flush=True)
    svg = os.path.splitext(args.json or args.ckpt)[0] + ".eps_sweep.svg"
    svg_plot(svg, {"PGD-20 accuracy": [(e * 255, a) for e, a in sweep]}, "eps (x 1/255)",
             f"{os.path.basename(args.ckpt)}: accuracy under PGD-20")
    print(f"wrote {svg}")
    return sweep


def load(args):
    """(checkpoint, model in eval mode on args.device, test images float [n, 3, 32, 32] in [0, 1], labels [n])."""
    ckpt = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(ckpt, args.ckpt).to(args.device).eval()
    if args.device == "cuda":  # NHWC on CUDA; NCHW on the CPU at every width (train.py: NHWC there from width 16)
        model = model.to(memory_format=torch.channels_last)
    dataset = ckpt["config"].get("train", {}).get("dataset", "cifar10")  # older checkpoints are CIFAR-10's
    _, _, x_test, y_test = load_dataset(dataset, args.data, download=True)
    # A fixed subset spread over the whole test set: the same images every run, and no single class even
    # where a copy stores the test set sorted by class (the JPEG copy in shared/ does).
    subset = torch.randperm(len(x_test), generator=torch.Generator().manual_seed(0))[:args.n].sort().values
    return ckpt, model, x_test[subset].to(args.device).float() / 255, y_test[subset].to(args.device)


def main(args):
    if not args.amp:  # float32 means float32: no TF32 convolutions or matmuls on Ampere and later GPUs
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    ckpt, model, x, y = load(args)
    train_cfg = ckpt["config"].get("train", {})
    dataset = train_cfg.get("dataset", "cifar10")
    print(f"{args.ckpt}: {train_cfg.get('loss', '?')} loss, {model.config['arch']}, {dataset}, "
          f"epoch {ckpt['epoch']} | {len(x)} test images | eps {args.eps:.4f} alpha {args.alpha:.4f} | "
          f"{args.device}{' bf16' if args.amp else ' float32'}")
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp):
        result = robustness(model, x, y, args.attacks, args.eps, args.alpha, args.batch_size, args.seed)
        if args.eps_sweep:
            result["eps_sweep"] = eps_sweep(model, x, y, args)
            left = result["eps_sweep"][-1][1]  # accuracy at eps 32/255
            if left > 0.05:  # in the JSON's warnings too, as the sanity checks are
                result["warnings"].append(f"{left:.1%} accuracy remains at eps 32/255: it should fall to ~0 at "
                                          "large eps; otherwise suspect gradient masking")
                print(f"warning: {result['warnings'][-1]}")
    hardware = torch.cuda.get_device_name(args.device) if args.device == "cuda" else "cpu"
    result.update(checkpoint=args.ckpt, loss=train_cfg.get("loss"), epoch=ckpt["epoch"], device=hardware,
                  torch=torch.__version__, precision="bf16" if args.amp else "float32",
                  data=os.path.abspath(args.data), dataset=dataset, train_config=train_cfg)
    if args.json:
        save_atomic_text(json.dumps(json_safe(result), indent=2) + "\n", args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    cli(main, get_args, "eval.py")
