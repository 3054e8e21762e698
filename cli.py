"""Command-line plumbing shared by train.py, eval.py, bench.py and the research tools, kept apart so those read
as what they do.

One-line errors with exit status 2 (`CLIError`, `Parser`, `cli`), argument types (`eps_type`, `positive`,
`non_negative`, `seed_type`, `file_path`, `new_file_path`), atomic writes, the hand-written SVG plot, the live
progress line and the scope of a Ctrl-C/SIGTERM handler (`on_stop_signals`). Checkpoints are read in resume.py.
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time

import torch

from data import DataError


class CLIError(Exception):
    """A problem with the user's input: printed on one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit 2, instead of usage + message
        raise CLIError(message)


def eps_type(text):
    """A radius or step in [0, 1] pixel units, written 0.031 or 8/255."""
    try:
        num, _, den = text.partition("/")
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (write 0.031 or 8/255)")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1] (pixel units, e.g. 8/255)")
    return value


def at_least(kind, low, strict):
    """An argparse type: a finite `kind` value > low (strict) or >= low."""
    def check(text):
        value = kind(text)
        if not math.isfinite(value) or not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low}, got {text}")
        return value
    check.__name__ = kind.__name__  # argparse names it in "invalid int value: '1.5'"
    return check


def positive(kind):
    return at_least(kind, 0, strict=True)


def non_negative(kind):
    return at_least(kind, 0, strict=False)


def resolve_device(parser, args):
    """--device defaults to cuda when available. --amp on a CPU without native bf16 is allowed, with a warning."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available on this machine; use --device cpu")
    flags = set(cpuinfo("flags").split()) if getattr(args, "amp", False) and args.device == "cpu" else set()
    if flags and not flags & BF16_FLAGS and not WARNED:  # flags empty: not asked, or /proc/cpuinfo unreadable
        WARNED.add("bf16")  # once a process: bench.py parses train.py's flags for every variant
        print(f"{parser.prog}: warning: --amp on a CPU without native bf16 (none of {', '.join(sorted(BF16_FLAGS))} "
              "in /proc/cpuinfo): bf16 is emulated there, 2-10x slower than float32 as measured (docs/speed.md); "
              "drop --amp", file=sys.stderr)


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # the CPU instructions that run bf16 natively (lscpu's names)
WARNED = set()


def cpuinfo(field):
    """A field of the first CPU in /proc/cpuinfo (Linux: "model name", "flags"), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def flag_names(argv):
    """The --flags typed in a command line, without their =values (--eps=0.03 -> --eps)."""
    return [t.split("=")[0] for t in argv if t.startswith("--")]


def seed_type(text):
    """An argparse type: a random seed, an integer in [0, 2**32) (larger ones overflow torch's generators once the
    data order adds to them)."""
    seed = int(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"seed {text} is outside [0, 2**32)")
    return seed


def file_path(text):
    """An argparse type: a file to write, not a folder (checked at parse time, not after the work is done)."""
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder or empty; name the file, e.g. "
                                         f"{os.path.join(text or '.', 'NAME')}")
    return text


def new_file_path(text):
    """file_path, in a folder that exists (for outputs whose tool does not create folders)."""
    file_path(text)
    if not os.path.isdir(os.path.dirname(os.path.abspath(text))):
        raise argparse.ArgumentTypeError(f"{os.path.dirname(text)} is not a folder; create it, or name a file in one")
    return text


def save_atomic(obj, path, write=torch.save):
    """Write to a temporary file, flush it to disk, then rename: neither a crash nor a second Ctrl-C leaves a
    half-written file at `path` (nor the temporary one)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic_text(text, path):
    save_atomic(text.encode(), path, write=lambda data, f: f.write(data))


def to_cpu(obj):
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def json_safe(value):
    """NaN (a quantity not measured, e.g. clean training accuracy under --loss ce) as null: strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def svg_plot(path, series, xlabel, title):
    """A small hand-written SVG line chart. series: {name: [(x, y), ...]} with y in [0, 1] for accuracies;
    any other series (a loss) is scaled to its own maximum and drawn dashed."""
    W, H, L, R, T, Bm = 640, 360, 50, 150, 30, 40
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    xs = [x for pts in series.values() for x, _ in pts] or [0, 1]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: T + (1 - y) * (H - T - Bm)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/><text x="{L}" y="18">{title}</text>']
    for k in range(6):  # horizontal grid, 0 to 1
        y = py(k / 5)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{k / 5:.1f}</text>')
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>'
               f'<text x="{L}" y="{H - Bm + 16}" text-anchor="middle">{x0:g}</text>'
               f'<text x="{W - R}" y="{H - Bm + 16}" text-anchor="middle">{x1:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts:
            continue
        is_loss = "loss" in name
        scale = max(abs(y) for _, y in pts) or 1.0 if is_loss else 1.0
        line = " ".join(f"{px(x):.1f},{py(y / scale):.1f}" for x, y in pts)
        dash = ' stroke-dasharray="5,3"' if is_loss else ""
        label = f"{name} (/ {scale:.3g})" if is_loss else name
        c = colors[i % len(colors)]
        out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"{dash}/>'
                   f'<text x="{W - R + 8}" y="{T + 16 * i + 4}" fill="{c}">{label}</text>')
    out.append("</svg>")
    save_atomic_text("\n".join(out) + "\n", path)


class Progress:
    """A live status line: done of total, images/s, a note, elapsed time and ETA. Redrawn in place on a terminal;
    on a pipe (a log file) one plain line every PIPE_SECONDS."""
    PIPE_SECONDS = 30

    def __init__(self, label, total, images_per_unit=1, first=0):
        self.label, self.total, self.per_unit, self.first = label, total, images_per_unit, first  # first: resumed
        self.start = self.last = time.time()
        self.tty, self.width = sys.stdout.isatty(), 0

    def update(self, done, note=""):
        """Show `done` (of total) if a refresh is due; returns True when it printed (a moment for the caller's
        occasional host sync)."""
        now = time.time()
        if now - self.last < (0.5 if self.tty else self.PIPE_SECONDS):
            return False
        self.last, elapsed = now, now - self.start
        rate = (done - self.first) / max(elapsed, 1e-9)  # units per second
        eta = (self.total - done) / rate if rate > 0 else math.inf
        bar = "#" * int(20 * done / max(self.total, 1))
        speed = rate * self.per_unit  # images/s; under 10, with decimals (a long attack's few images a second)
        speed = f"{speed:.0f}" if speed >= 10 else f"{speed:.2f}"
        line = (f"{self.label} [{bar:<20}] {int(done)}/{self.total}{' ' + note if note else ''} | {speed} img/s | "
                f"{elapsed:.0f} s, ETA {eta:.0f} s")
        self.width = max(self.width, len(line))
        print("\r" + line.ljust(self.width) if self.tty else line, end="" if self.tty else "\n", flush=True)
        return True

    def close(self):
        if self.tty and self.width:
            print("\r" + " " * self.width + "\r", end="", flush=True)


@contextlib.contextmanager
def on_stop_signals(handler):
    """`handler` for Ctrl-C and SIGTERM (how `kill` and clusters stop a job) inside the block; the handlers found
    before come back after it, so a caller in Python (the tests) keeps its own."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cli(main_fn, args_fn, prog):
    """Run a CLI: a user error is one line on stderr and exit status 2, a Ctrl-C one line and exit status 130;
    never a traceback."""
    try:
        sys.exit(main_fn(args_fn()))
    except (CLIError, DataError, OSError) as e:  # OSError: a path that cannot be written
        rank = int(os.environ.get("RANK", 0))
        if rank > 0:  # under torchrun rank 0 says it: wait, so that torchrun does not end rank 0 before it can;
            time.sleep(5)  # torchrun ends this process once rank 0 exits, so still here = an error of its own
        print(f"{prog}: error: {f'rank {rank}: ' if rank else ''}{e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C where no handler saves (or a second one in train.py): no traceback
        if int(os.environ.get("RANK", 0)) == 0:  # torchrun signals every rank: rank 0 says it
            print(f"{prog}: {str(e) or 'interrupted'}", file=sys.stderr)
        # 128 + the signal, as a shell reports a process it stopped: 130 for Ctrl-C, 143 for a second SIGTERM
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
