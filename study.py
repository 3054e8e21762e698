"""A grid of train.py + eval.py runs (losses x seeds): resumable, one JSON row per finished run, and a summary.

    python study.py --losses ce,supcon,anchor,trades --seeds 0,1,2 --out results/cpu_study -- --data ./data --width 8
    python study.py ... (the same command again)       # after Ctrl-C, a crash or on another machine: continues
    python study.py --out results/cpu_study --summarize  # only rewrite the table and chart from the rows

For each seed, then each loss, the run `OUT/runs/LOSS_sSEED` is trained by train.py (the flags after `--`, plus
--loss, --seed, --out), continued with --resume if a checkpoint is there, and its .best.pt (chosen on train.py's
validation slice, never the test set) is evaluated by eval.py: --attacks on --n test images, and AutoAttack on
the first --aa-n of those same images. Runs of one seed start from the same weights and see the same data order
whatever the loss, so methods are compared paired by seed. OUT holds:

    study.json    the grid's recipe; a rerun with other train.py or eval flags is refused
    rows.jsonl    one row per finished or failed run (status "ok" or "failed"), appended as each ends
    summary.md    per method: mean and spread over seeds, the paired difference to ce with a 95% interval, every run
    summary.svg   clean, PGD-20 and AutoAttack accuracy: a point per seed, the mean marked
    runs/         each run's checkpoints (.pt, not for git), log (.jsonl), curves (.svg), console output, eval JSON
"""
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import train
from cli import CLIError, Parser, cli, non_negative, on_stop_signals, positive, save_atomic_text
from data import DATASETS
from eval import attack_list

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY_FLAGS = {"--loss", "--seed", "--out", "--resume"}  # study.py sets these for every run
METRICS = [("clean", "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack")]
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 2.0 beyond (2.021 at 40, 1.96 at infinity).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = Parser(description="A resumable grid of train.py + eval.py runs, aggregated.", allow_abbrev=False,
               usage="study.py --losses L,L --seeds S,S --out DIR [eval flags] -- [train.py flags]")
    p.add_argument("--losses", type=str, default="ce,supcon,anchor,trades", help=f"comma-separated subset of {','.join(train.LOSSES)}")
    p.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated integer seeds")
    p.add_argument("--out", type=str, required=True, help="the study's folder (rows, summary, runs); rerun with the same to continue")
    p.add_argument("--n", type=positive(int), default=2000, help="test images for --attacks (eval.py's fixed subset)")
    p.add_argument("--attacks", type=attack_list, default=["clean", "pgd20"], help="eval.py attacks on the --n images")
    p.add_argument("--aa-n", type=non_negative(int), default=500, help="AutoAttack on the first N of those images (0: none)")
    p.add_argument("--eval-batch-size", type=positive(int), default=500, help="eval.py --batch-size")
    p.add_argument("--summarize", action="store_true", help="only rewrite summary.md and summary.svg from rows.jsonl")
    args = p.parse_args(own)
    if args.summarize:
        return args
    args.losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    unknown = [s for s in args.losses if s not in train.LOSSES]
    if unknown or not args.losses or len(set(args.losses)) < len(args.losses):
        p.error(f"argument --losses: {unknown[0] if unknown else args.losses!r} is not a list of distinct losses "
                f"from {','.join(train.LOSSES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"argument --seeds: {args.seeds!r} is not a comma-separated list of integers, e.g. 0,1,2")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"argument --seeds: {args.seeds} repeats a seed")
    if args.aa_n > args.n:
        p.error(f"argument --aa-n: {args.aa_n} is more than --n {args.n}; AutoAttack runs on a subset of those images")
    taken = [f for f in train_flags if f.split("=")[0] in STUDY_FLAGS]
    if taken:
        p.error(f"train.py flag {taken[0]}: study.py sets --loss, --seed, --out and --resume itself; drop it")
    try:  # train.py's own parser judges its flags now, not hours into the grid
        args.train = train.get_args(train_flags + ["--loss", args.losses[0], "--seed", "0", "--out", "x.pt"])
    except CLIError as e:
        raise CLIError(f"train.py flags after --: {e}") from None
    args.train_flags = train_flags
    return args


def data_copy(data, dataset):
    """md5 of each file of the data set: which copy of the images a row was measured on."""
    spec = DATASETS[dataset]
    folder = os.path.join(data, spec.folder) if os.path.isdir(os.path.join(data, spec.folder)) else data
    digests = {}
    for name in [*spec.train_files, spec.test_file]:  # there: train.training_data has read them
        with open(os.path.join(folder, name), "rb") as f:
            digests[name] = hashlib.md5(f.read()).hexdigest()
    return {"path": os.path.abspath(folder), "md5": digests}


def cpu_name():
    """The CPU's model and the instruction set torch's CPU kernels use."""
    name = ""
    if os.path.exists("/proc/cpuinfo"):
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{name or platform.processor() or 'unknown CPU'} ({torch.backends.cpu.get_cpu_capability()})"


def recipe(args):
    """What makes two invocations the same study (losses and seeds may grow)."""
    return {"train_flags": args.train_flags, "n": args.n, "attacks": args.attacks, "aa_n": args.aa_n}


def read_rows(path):
    """The rows written so far; a line cut short by a crash is skipped with a warning."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for i, line in enumerate(f, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"warning: {path} line {i} is not a JSON row (cut short by a crash?); ignored", flush=True)
    return rows


def append_row(path, row):
    with open(path, "ab+") as f:  # appends go to the end, wherever the reads seek
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # a line cut short by a crash: the new row starts a line of its own
                f.write(b"\n")
        f.write((json.dumps(row) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


class Child:
    """A train.py or eval.py subprocess in its own process group, so Ctrl-C reaches it once, through us: a signal
    to study.py is passed on, train.py saves after its current step, and the study stops cleanly."""
    current, stopped = None, None

    @classmethod
    def forward(cls, signum, frame):
        cls.stopped = signum
        if cls.current is not None and cls.current.poll() is None:
            cls.current.send_signal(signum)

    @classmethod
    def run(cls, cmd, log):
        """Run cmd, its output shown and appended to `log`; -> (exit status, its last line: the error if it failed)."""
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            cls.current = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                           start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                        "OMP_NUM_THREADS": str(torch.get_num_threads())})
            if cls.stopped:  # a signal came while no child ran: this one stops at its first chance
                cls.current.send_signal(cls.stopped)
            last = ""
            for line in cls.current.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                f.write(line)
                last = line.strip() or last
        code = cls.current.wait()
        cls.current = None
        return code, last


def run_one(args, loss, seed, runs, data):
    """Train and evaluate one (loss, seed); -> its row. Files already there are continued, not redone."""
    stem = os.path.join(runs, f"{loss}_s{seed}")
    ckpt, log = stem + ".pt", stem + ".console.log"
    files = train.paths(ckpt)
    if not os.path.exists(ckpt):  # a first epoch cut short can leave a best checkpoint or log without the last one
        for p in files.values():
            if os.path.exists(p):
                os.remove(p)
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *args.train_flags, "--loss", loss, "--seed", str(seed),
           "--out", ckpt] + (["--resume"] if os.path.exists(ckpt) else [])
    failed = {"loss": loss, "seed": seed, "status": "failed", "command": cmd}
    code, last = Child.run(cmd, log)
    if Child.stopped:
        return None
    if code != 0:
        return {**failed, "stage": "train", "exit": code, "error": last}
    history = [json.loads(line) for line in open(files["log"])]
    best = history[torch.load(files["best"], map_location="cpu", weights_only=True)["epoch"] - 1]
    row = {"loss": loss, "seed": seed, "status": "ok", "best_epoch": best["epoch"], "val_clean": best["val_clean"],
           "val_pgd": best["val_pgd"], "train_s": sum(r["s"] for r in history), "history": history,
           "command": cmd, "eval_commands": [], "eval_s": 0.0, "accuracy": {}, "n": {},
           "autoattack_stages": None}
    evals = [(args.attacks, args.n, "eval")] + ([(["autoattack"], args.aa_n, "aa")] if args.aa_n else [])
    for attacks, n, tag in evals:
        out = f"{stem}.{tag}.json"
        cmd = [sys.executable, os.path.join(HERE, "eval.py"), files["best"], "--data", args.train.data, "--n", str(n),
               "--attacks", ",".join(attacks), "--batch-size", str(args.eval_batch_size), "--device",
               args.train.device, "--json", out]
        row["eval_commands"].append(cmd)
        fresh = os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(files["best"])
        t0 = time.time()
        code, last = (0, "") if fresh else Child.run(cmd, log)
        if Child.stopped:
            return None
        if code != 0:
            return {**failed, "stage": "eval", "exit": code, "error": last}
        with open(out) as f:
            result = json.load(f)
        row["eval_s"] += time.time() - t0
        for name, acc in result["accuracy"].items():
            if name != "worst":
                row["accuracy"][name], row["n"][name] = acc, result["n"]
        row.update(device=result["device"], torch=result["torch"], train_config=result["train_config"])
        if result.get("autoattack_stages") is not None:  # from the AutoAttack evaluation only
            row["autoattack_stages"] = result["autoattack_stages"]
    # Bit-for-bit reruns need the same torch, data copy, CPU kernels and thread count (they change the rounding).
    row.update(data=data, threads=torch.get_num_threads(), cpu=cpu_name())  # Child.run gives the children this many
    return row


def mean_sd(values):
    return (statistics.mean(values) if values else math.nan,
            statistics.stdev(values) if len(values) > 1 else math.nan)


def paired(rows, loss, metric):
    """(mean, half-width of the 95% t-interval, number of seeds) of loss - ce over the seeds both finished."""
    by = {(r["loss"], r["seed"]): r["accuracy"].get(metric) for r in rows}
    diffs = [by[(loss, s)] - by[("ce", s)] for (l, s) in by if l == loss and ("ce", s) in by
             and by[(loss, s)] is not None and by[("ce", s)] is not None]
    mean, sd = mean_sd(diffs)
    df = len(diffs) - 1
    half = (T95[df - 1] if df <= len(T95) else 2.0) * sd / math.sqrt(len(diffs)) if df > 0 else math.nan
    return mean, half, len(diffs)


def pct(v, sd=None):
    if v is None or not math.isfinite(v):
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None and math.isfinite(sd) else "")


def summary_markdown(rows, losses, study):
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["# Study summary", "", f"Train flags: `{' '.join(study['train_flags'])}`; evaluation: "
             f"{','.join(study['attacks'])} on {study['n']} test images, AutoAttack on {study['aa_n']}.", "",
             "Accuracy in %, mean ± standard deviation over seeds.", "",
             "| method | seeds | " + " | ".join(name for _, name in METRICS) + " |", "|---" * (2 + len(METRICS)) + "|"]
    for loss in losses:
        mine = [r for r in ok if r["loss"] == loss]
        cells = [pct(*mean_sd([r["accuracy"][m] for r in mine if m in r["accuracy"]])) for m, _ in METRICS]
        lines.append(f"| {loss} | {len(mine)} | " + " | ".join(cells) + " |")
    if any(r["loss"] == "ce" for r in ok):
        lines += ["", "Difference to ce, paired by seed (points; 95% t-interval over the seed differences; "
                  "`*` where the interval excludes 0):", "",
                  "| method | " + " | ".join(name for _, name in METRICS) + " |", "|---" * (1 + len(METRICS)) + "|"]
        for loss in [l for l in losses if l != "ce"]:
            cells = []
            for m, _ in METRICS:
                mean, half, n = paired(ok, loss, m)
                cell = "–" if not n else f"{100 * mean:+.1f}" + (f" [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]"
                                                               if math.isfinite(half) else " (1 seed)")
                cells.append(cell + (" *" if math.isfinite(half) and abs(mean) > half else ""))
            lines.append(f"| {loss} − ce | " + " | ".join(cells) + " |")
    lines += ["", "Every run (the loss terms are training means over the first and the last epoch; the second term is "
              "the contrastive loss for anchor and supcon, the KL for trades, 0 for ce):", "",
              "| method | seed | status | best epoch | val clean | val PGD | " + " | ".join(name for _, name in METRICS)
              + " | train min | CE term | second term |", "|---" * (9 + len(METRICS)) + "|"]
    for r in rows:
        if r["status"] == "ok":
            epochs = [e for e in r.get("history", []) if e["stage"] == "train"]
            trend = [f"{epochs[0][k]:.3f} → {epochs[-1][k]:.3f}" if epochs else "–" for k in ("ce", "second")]
            cells = [str(r["best_epoch"]), pct(r["val_clean"]), pct(r["val_pgd"]),
                     *[pct(r["accuracy"].get(m)) for m, _ in METRICS], f"{r['train_s'] / 60:.1f}", *trend]
        else:
            cells = [f"failed in {r['stage']}: {r['error']}", *[""] * (5 + len(METRICS))]
        lines.append(f"| {r['loss']} | {r['seed']} | {r['status']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_svg(rows, losses, path):
    """One panel per metric: the methods across, a dot per seed, a bar at the mean (accuracy in %)."""
    ok = [r for r in rows if r["status"] == "ok"]
    W, H, L, T, B = 230, 300, 45, 30, 40  # one panel
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(METRICS)}" height="{H}" '
           'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for k, (m, name) in enumerate(METRICS):
        vals = [100 * r["accuracy"][m] for r in ok if m in r["accuracy"]]
        if not vals:
            continue
        lo, hi = math.floor(min(vals) / 5) * 5, math.ceil(max(vals) / 5) * 5 + (5 if min(vals) == max(vals) else 0)
        x0 = k * W + L
        py = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)
        out.append(f'<text x="{x0}" y="16" font-size="13">{name} accuracy (%)</text>')
        for tick in range(int(lo), int(hi) + 1, 5):
            out.append(f'<line x1="{x0}" x2="{x0 + W - L - 10}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#ddd"/>'
                       f'<text x="{x0 - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick}</text>')
        step = (W - L - 10) / len(losses)
        for i, loss in enumerate(losses):
            cx = x0 + step * (i + 0.5)
            mine = [(r["seed"], 100 * r["accuracy"][m]) for r in ok if r["loss"] == loss and m in r["accuracy"]]
            out.append(f'<text x="{cx:.1f}" y="{H - B + 16}" text-anchor="middle">{loss}</text>')
            for j, (seed, v) in enumerate(sorted(mine)):
                out.append(f'<circle cx="{cx + 5 * (j - (len(mine) - 1) / 2):.1f}" cy="{py(v):.1f}" r="3" '
                           f'fill="{colors[i % len(colors)]}" fill-opacity="0.6"><title>{loss} seed {seed}: {v:.1f}</title></circle>')
            if mine:
                mean = statistics.mean(v for _, v in mine)
                out.append(f'<line x1="{cx - 14:.1f}" x2="{cx + 14:.1f}" y1="{py(mean):.1f}" y2="{py(mean):.1f}" '
                           f'stroke="black" stroke-width="2"><title>{loss} mean {mean:.2f}</title></line>')
    out.append("</svg>")
    save_atomic_text("\n".join(out) + "\n", path)


def summarize(out):
    study, rows = json.load(open(os.path.join(out, "study.json"))), read_rows(os.path.join(out, "rows.jsonl"))
    losses = sorted({r["loss"] for r in rows}, key=["ce", "supcon", "anchor", "trades"].index)  # the baseline first
    save_atomic_text(summary_markdown(rows, losses, study), os.path.join(out, "summary.md"))
    summary_svg(rows, losses, os.path.join(out, "summary.svg"))


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def run_grid(args, grid, todo, rows_file, data):
    """Run the runs of `todo` (the unfinished part of `grid`) in turn, appending each row to `rows_file`; -> exit
    status, 128 + signal if one stopped it."""
    start, failures = time.time(), 0
    for i, (loss, seed) in enumerate(todo):
        if Child.stopped:  # a signal between two runs
            print("study interrupted; rerun the same command to continue")
            return 128 + Child.stopped
        eta = f"ETA {hms((time.time() - start) / i * (len(todo) - i))}" if i else "ETA after the first run"
        print(f"\n=== run {len(grid) - len(todo) + i + 1}/{len(grid)}: {loss} seed {seed} | elapsed "
              f"{hms(time.time() - start)} | {eta}", flush=True)
        row = run_one(args, loss, seed, os.path.join(args.out, "runs"), data)
        if row is None:  # a signal: the run saved where it was and continues on the next invocation
            print(f"study interrupted: {loss} seed {seed} saved; rerun the same command to continue")
            return 128 + Child.stopped
        append_row(rows_file, row)
        failures += row["status"] == "failed"
        if row["status"] == "failed":
            print(f"run {loss} seed {seed} FAILED in {row['stage']}: {row['error']} (recorded; the study goes on)")
        summarize(args.out)
    print(f"study done in {hms(time.time() - start)}: {len(todo) - failures} runs finished, {failures} failed; "
          f"see {os.path.join(args.out, 'summary.md')}")
    return 1 if failures else 0


def main(args):
    study_file, rows_file = os.path.join(args.out, "study.json"), os.path.join(args.out, "rows.jsonl")
    if args.summarize:
        if not os.path.exists(study_file):
            raise CLIError(f"{args.out} holds no study (no study.json); run the grid first")
        summarize(args.out)
        print(f"wrote {os.path.join(args.out, 'summary.md')} and summary.svg")
        return 0
    if os.path.exists(study_file):
        saved = json.load(open(study_file))
        if saved != recipe(args):
            diff = sorted(k for k in saved if saved[k] != recipe(args)[k])
            raise CLIError(f"{args.out} holds a study with other {', '.join(diff)} ({saved[diff[0]]}); rerun with "
                           "the same flags to continue it, or choose another --out")
    train.training_data(args.train, download=False)  # --data, --limit, --val and --batch-size fit, before any run
    data = data_copy(args.train.data, args.train.dataset)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    save_atomic_text(json.dumps(recipe(args), indent=2) + "\n", study_file)
    done = {(r["loss"], r["seed"]) for r in read_rows(rows_file) if r["status"] == "ok"}
    grid = [(loss, seed) for seed in args.seeds for loss in args.losses]  # seed by seed: early pairs to compare
    todo = [g for g in grid if g not in done]
    print(f"study {args.out}: {len(grid)} runs, {len(grid) - len(todo)} finished before, {len(todo)} to run")
    with on_stop_signals(Child.forward):
        try:
            return run_grid(args, grid, todo, rows_file, data)
        finally:
            Child.stopped = None  # a next call from Python (the tests) starts unstopped


if __name__ == "__main__":
    cli(main, get_args, "study.py")
