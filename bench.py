"""Training throughput: images per second of one full adversarial-training step (PGD attack + update).

    python bench.py                          # CUDA: ResNet-18, batch 512, PGD-10, every precision variant
    python bench.py --device cpu             # a tiny configuration, well under a minute
    python bench.py --arch wrn-34-10         # another architecture (model.py's names)
    python bench.py --json bench.json
    python bench.py --variants bf16+channels_last --trace traces/   # + a profiled step of each loss

The step is step.py's `train_step`, the one train.py runs (imported, not copied). Each figure is the median
over timed steps after warm-up, with the device synchronized around every timed step; the data are random
images on the device, since the content does not change the work.
"""
import gzip
import json
import os
import platform
import statistics
import time

import torch

import cli
import step
import train
from model import arch_key

# name -> extra train.py flags. Without bf16, CUDA runs what train.py runs: TF32 convolutions (cuDNN's default)
# and float32 matmuls; the table's header says so.
VARIANTS = {
    "fp32": ["--no-channels-last"],
    "channels_last": ["--channels-last"],
    "bf16": ["--amp", "--no-channels-last"],
    "bf16+channels_last": ["--amp", "--channels-last"],
    "bf16+channels_last+compile": ["--amp", "--channels-last", "--compile"],
    "fp32+compile": ["--no-channels-last", "--compile"],
    "channels_last+compile": ["--channels-last", "--compile"],
}
DEFAULTS = {"cuda": ["fp32", "channels_last", "bf16", "bf16+channels_last", "bf16+channels_last+compile"],
            "cpu": ["fp32", "channels_last", "bf16", "bf16+channels_last"]}


def get_args(argv=None):
    p = cli.Parser(description="Training-step throughput of train.py.", allow_abbrev=False)
    p.add_argument("--device", type=str, default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--batch-size", type=cli.positive(int), default=None,
                   help="images per step (default 512 on CUDA, 32 on the CPU)")
    p.add_argument("--arch", type=str, default="resnet18", help="model.py's name, e.g. preact-resnet18, wrn-34-10")
    p.add_argument("--width", type=cli.positive(int), default=None,
                   help="ResNet base width (default 64 on CUDA, 8 on the CPU); not for a WRN")
    p.add_argument("--steps", type=cli.positive(int), default=10, help="PGD steps of the training attack")
    p.add_argument("--variants", type=str, default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default: {','.join(DEFAULTS['cuda'])} "
                   f"on CUDA, {','.join(DEFAULTS['cpu'])} on the CPU)")
    p.add_argument("--losses", type=str, default="ce,anchor", help="comma-separated train.py --loss values")
    p.add_argument("--warmup", type=cli.non_negative(int), default=None,
                   help="untimed steps first (default 10 on CUDA, 2 on the CPU; compile needs them)")
    p.add_argument("--iters", type=cli.positive(int), default=None,
                   help="timed steps (default 30 on CUDA, 5 on the CPU)")
    p.add_argument("--json", type=cli.new_file_path, default=None, help="write the table to this JSON file")
    p.add_argument("--trace", type=str, default=None, help="also profile one step of each row into this folder: "
                   "a Chrome trace (.json.gz) and the top ops with the step's host syncs (.txt)")
    args = p.parse_args(argv)
    args.amp = False
    try:
        args.is_wrn = arch_key(args.arch) == "wrn-D-K"  # a WRN's name gives its widths: no --width for it
    except ValueError as e:
        p.error(f"argument --arch: {str(e).removeprefix('model config: ')}")
    if args.is_wrn and args.width is not None:
        p.error(f"argument --width: {args.arch} gives its own widths; drop --width")
    cli.resolve_device(p, args)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (512 if cuda else 32)
    args.width = args.width or (64 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.iters = args.iters or (30 if cuda else 5)
    args.variants = args.variants.split(",") if args.variants else DEFAULTS[args.device]
    if args.variants is DEFAULTS["cpu"] and not args.is_wrn and args.width < 8:  # oneDNN's AVX2 NHWC kernels crash
        args.variants = [v for v in args.variants if "channels_last" not in v]
    args.losses = args.losses.split(",")
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"argument --variants: unknown {v!r}; choose from {','.join(VARIANTS)}")
    for loss in args.losses:
        if loss not in train.LOSSES:
            p.error(f"argument --losses: unknown {loss!r}; choose from {','.join(train.LOSSES)}")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(loss, variant, args):
    """(median images/s, host syncs in a profiled step or None) of step.train_step for one loss and variant."""
    width = [] if args.is_wrn else ["--width", str(args.width)]
    targs = train.get_args(["--loss", loss, "--device", args.device, "--batch-size", str(args.batch_size),
                            "--arch", args.arch, *width, "--steps", str(args.steps)] + VARIANTS[variant])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, net = train.make_model(targs, device)
    opt = step.make_optimizer(model, targs, finetune=False)
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    times = []
    for i in range(args.warmup + args.iters):
        sync(device)
        t0 = time.perf_counter()
        step.train_step(model, net, opt, x, y, targs)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    syncs = None
    if args.trace:
        syncs = profile(lambda: step.train_step(model, net, opt, x, y, targs), device,
                        os.path.join(args.trace, f"{loss}_{variant}"))
    return args.batch_size / statistics.median(times), syncs


def profile(run_step, device, path):
    """Profile one call of run_step: a Chrome trace at path.json.gz and path.txt with the ops that took the most
    time and the count of host syncs (aten::_local_scalar_dense is .item(), bool() or int() of a device tensor).
    Returns that count."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run_step()
        sync(device)
    prof.export_chrome_trace(path + ".json")
    with open(path + ".json", "rb") as f, gzip.open(path + ".json.gz", "wb") as g:
        g.write(f.read())
    os.remove(path + ".json")
    ops = prof.key_averages()
    syncs = sum(e.count for e in ops if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                                   "cudaDeviceSynchronize"))
    order = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    cli.save_atomic_text(f"host syncs in the step: {syncs}\n" + ops.table(sort_by=order, row_limit=30) + "\n",
                         path + ".txt")
    return syncs


def main(args):
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as train.py sets it (CUDA only)
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)}; non-bf16 variants run TF32 convolutions (cuDNN's default)"
    else:
        name = f"{cli.cpuinfo('model name') or platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    model = args.arch if args.is_wrn else f"{args.arch} width {args.width}"
    print(f"{name} | torch {torch.__version__} | {model} | batch {args.batch_size} | "
          f"PGD-{args.steps} | median of {args.iters} steps after {args.warmup}")
    print(f"{'loss':<8} {'precision':<28} {'images/s':>9} {'vs ce':>7}" + ("  host syncs" if args.trace else ""))
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    rows = []
    for variant in args.variants:
        base = None
        for loss in args.losses:
            rate, syncs = measure(loss, variant, args)
            base = rate if loss == "ce" else base
            overhead = f"{base / rate - 1:+7.1%}" if base and loss != "ce" else ""
            print(f"{loss:<8} {variant:<28} {rate:9.1f} {overhead:>7}" + (f"  {syncs:10d}" if args.trace else ""),
                  flush=True)
            rows.append({"loss": loss, "precision": variant, "images_per_s": rate,
                         "time_vs_ce": base / rate if base else None, "host_syncs": syncs})
    if args.json:
        table = {"device": name, "torch": torch.__version__, "batch_size": args.batch_size, "arch": args.arch,
                 "width": args.width, "pgd_steps": args.steps, "warmup": args.warmup, "iters": args.iters, "rows": rows}
        cli.save_atomic_text(json.dumps(table, indent=2) + "\n", args.json)
    return 0


if __name__ == "__main__":
    cli.cli(main, get_args, "bench.py")
