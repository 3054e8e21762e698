"""train.py against a plain PGD-AT loop written the usual way, side by side on the same machine and data.

    python research/bench_peer.py --data ./data                     # CPU: ResNet-18 width 16, batch 128, PGD-10, 1,280 images
    python research/bench_peer.py --data ./data --repeats 3 --json results/bench_peer_cpu.json

The peer is what most adversarial-training repositories do: a Dataset that crops and flips one image at a time
behind a DataLoader, a PGD loop that calls loss.backward() (which also computes every parameter's gradient,
thrown away at each step), NCHW tensors, SGD. train.py's figure is one real `train.py --loss ce` epoch (its
logged `train_s`, validation excluded), run as a user runs it. Both train the same model (model.py's, same
width) on the same images with the same batch and PGD steps; the two alternate, `--repeats` times, and the
median of each is reported. A benchmark, not a test and not a dependency of anything.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import repo  # the repository root on sys.path (research/repo.py)
import cli
from data import DATASETS, load_dataset
from model import build_model


class CropFlip(torch.utils.data.Dataset):
    """CIFAR images one at a time: 4-pixel zero-padded random crop and random horizontal flip, as float [0, 1]."""

    def __init__(self, x, y):
        self.x, self.y = x.numpy(), y.numpy()  # uint8 (N, 3, 32, 32), int64 (N,)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img = np.pad(self.x[i], ((0, 0), (4, 4), (4, 4)))
        r, c = np.random.randint(0, 9, size=2)
        img = img[:, r:r + 32, c:c + 32]
        if np.random.rand() < 0.5:
            img = img[:, :, ::-1]
        return torch.from_numpy(img.astype(np.float32) / 255), int(self.y[i])


def peer_epoch(model, loader, opt, eps, alpha, steps):
    """One epoch of PGD-AT the usual way; returns (images, seconds)."""
    n, t0 = 0, time.perf_counter()
    for x, y in loader:
        model.eval()
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()  # the usual way: parameter gradients are computed too, then discarded
            delta.data = (delta + alpha * delta.grad.sign()).clamp(-eps, eps)
            delta.data = (x + delta).clamp(0, 1) - x
            delta.grad.zero_()
        model.train()
        loss = F.cross_entropy(model(x + delta.detach()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(x)
    return n, time.perf_counter() - t0


def train_py_epoch(args, loss):
    """images/s of one real train.py epoch (its own train_s: training steps only, validation excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "b.pt")
        cmd = [sys.executable, os.path.join(repo.ROOT, "train.py"), "--data", args.data,
               "--loss", loss, "--epochs", "1", "--limit", str(args.images), "--val", "0", "--batch-size",
               str(args.batch_size), "--width", str(args.width), "--steps", str(args.steps), "--device", "cpu",
               "--out", out, *args.train_flags]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise cli.CLIError(f"train.py failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        with open(out[:-3] + ".jsonl") as f:
            row = json.loads(f.readline())
    return args.images / row["train_s"]


def get_args(argv=None):
    p = cli.Parser(description="train.py vs a plain PGD-AT loop, images/s side by side (CPU).", allow_abbrev=False)
    p.add_argument("--data", type=str, default="./data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--images", type=cli.positive(int), default=1280, help="training images per epoch (a multiple of the batch)")
    p.add_argument("--batch-size", type=cli.positive(int), default=128, help="images per step")
    p.add_argument("--width", type=cli.positive(int), default=16, help="ResNet-18 base width")
    p.add_argument("--steps", type=cli.positive(int), default=10, help="PGD steps")
    p.add_argument("--workers", type=cli.non_negative(int), default=0, help="the peer's DataLoader workers (0: in the main process, the fastest on 2 cores)")
    p.add_argument("--repeats", type=cli.positive(int), default=3, help="alternating measurements of each")
    p.add_argument("--losses", type=str, default="ce,anchor", help="train.py losses to time (ce is the one compared)")
    p.add_argument("--train-flags", type=str, default="", help="extra train.py flags, e.g. '--no-channels-last'")
    p.add_argument("--json", type=cli.new_file_path, default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    args.train_flags = args.train_flags.split()
    args.losses = args.losses.split(",")
    if args.images % args.batch_size:
        p.error(f"argument --images: {args.images} is not a multiple of --batch-size {args.batch_size}")
    return args


def main(args):
    x, y, _, _ = load_dataset("cifar10", args.data, download=False)
    x, y = x[:args.images], y[:args.images]
    spec = DATASETS["cifar10"]
    torch.manual_seed(0)
    model = build_model({"width": args.width, "mean": list(spec.mean), "std": list(spec.std)})
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(CropFlip(x, y), batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    print(f"CPU ({torch.get_num_threads()} threads) | torch {torch.__version__} | resnet18 width {args.width} | "
          f"batch {args.batch_size} | PGD-{args.steps} | {args.images} images per epoch | {args.repeats} repeats")
    figures = {"peer": [], **{f"train.py {loss}": [] for loss in args.losses}}
    for r in range(args.repeats):
        n, s = peer_epoch(model, loader, opt, 8 / 255, 2 / 255, args.steps)
        figures["peer"].append(n / s)
        for loss in args.losses:
            figures[f"train.py {loss}"].append(train_py_epoch(args, loss))
        print(f"repeat {r + 1}: " + " | ".join(f"{k} {v[-1]:.1f} img/s" for k, v in figures.items()), flush=True)
    median = {k: statistics.median(v) for k, v in figures.items()}
    for k, v in median.items():
        print(f"{k:<16} {v:7.1f} img/s  {v / median['peer']:5.2f}x the peer loop")
    if args.json:
        cli.save_atomic_text(json.dumps({"device": f"CPU ({torch.get_num_threads()} threads)", "torch": torch.__version__,
                                         "width": args.width, "batch_size": args.batch_size, "pgd_steps": args.steps,
                                         "images": args.images, "workers": args.workers, "train_flags": args.train_flags,
                                         "images_per_s": figures, "median": median}, indent=2) + "\n", args.json)
    return 0


if __name__ == "__main__":
    cli.cli(main, get_args, "bench_peer.py")
