"""A grid of train.py + eval.py runs (arms x seeds): resumable, one JSON row per finished run, and a summary.

    python research/study.py --losses ce,supcon,anchor,trades --seeds 0,1,2 --out results/cpu_study -- --data ./data --width 8
    python research/study.py --arm lam0="--loss anchor --lam 0" --grid temperature=0.05,0.2 --val-only --out DIR -- ...
    python research/study.py ... (the same command again)       # after Ctrl-C, a crash or on another machine: continues
    python research/study.py --out DIR --only ce,lam0 --seeds 0,1,2 -- ...   # arms already defined there: test-evaluate
    python research/study.py --out results/cpu_study --summarize  # only rewrite the table and chart from the rows

An arm is a set of train.py flags with a name: `--losses L,L` (arm L: --loss L), `--arm NAME="FLAGS"`, or
`--grid FLAG=V,V` (one arm per value, one factor at a time: arm FLAGV sets --FLAG V). For each seed, then each
arm, the run `OUT/runs/ARM_sSEED` is trained by train.py (the shared flags after `--`, the arm's flags, --seed,
--out), continued with --resume if a checkpoint is there, and its .best.pt (chosen on train.py's validation
slice, never the test set) is evaluated by eval.py: --attacks on --n test images, and AutoAttack on the first
--aa-n of those same images (--eval-last: the last epoch's checkpoint too; --eps-sweep-seed S: an eps sweep for
seed S). --val-only skips the test set; a later run without it evaluates the same
checkpoints, training nothing again. Runs of one seed start from the same weights and see the same data order
unless an arm changes the model or the data (--arch, --width, --limit, --batch-size), so arms are compared
paired by seed. OUT holds:

    study.json    the recipe (shared flags, evaluation, each arm's flags); a rerun that contradicts it is refused
    rows.jsonl    one row per finished or failed run (status "ok" or "failed"), appended as each ends
    summary.md    per arm: mean and spread over seeds, the paired difference to the reference arm, the validation
                  ranking with its noise, the second loss term per epoch, every run (summary.py; arms: arms.py)
    summary.svg   val PGD and the test accuracies: a point per seed, the mean marked
    runs/         each run's checkpoints (.pt, not for git), log (.jsonl), curves (.svg), console output, eval JSON
"""
import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

import repo  # noqa: F401  the repository root on sys.path (research/repo.py)
import arms
import resume
import train
from cli import CLIError, Parser, cli, cpuinfo, flag_names, non_negative, on_stop_signals, positive, save_atomic_text, seed_type
from data import DATASETS
from eval import attack_list
from summary import arm_of, summarize

HERE = repo.ROOT  # where train.py, eval.py and the git history are
SUMMARY_FLAGS = {"--summarize", "--out", "--reference", "--compare"}
EVAL_FLAGS = {"--n", "--attacks", "--aa-n", "--eval-batch-size", "--eval-last", "--eps-sweep-seed"}  # the test's


def get_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, train_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = Parser(description="A resumable grid of train.py + eval.py runs (arms x seeds), aggregated.", allow_abbrev=False,
               usage="study.py [--losses L,L] [--arm NAME=FLAGS] [--grid FLAG=V,V] --seeds S,S --out DIR [options] "
               "-- [shared train.py flags]")
    p.add_argument("--losses", type=str, default=None, help=f"arms named by loss, comma-separated from {','.join(train.LOSSES)} "
                   "(default when no arm is defined: all four)")
    p.add_argument("--arm", type=str, action="append", default=[], help='NAME="train.py flags", e.g. lam0="--loss anchor '
                   '--lam 0"; repeatable')
    p.add_argument("--grid", type=str, action="append", default=[], help="FLAG=V,V: one arm per value of a train.py "
                   "flag (e.g. lam=0,0.3,3 gives arms lam0, lam0.3, lam3), one factor at a time; repeatable")
    p.add_argument("--only", type=str, default=None, help="run only these arms (comma-separated), defined here or "
                   "already in OUT/study.json")
    p.add_argument("--reference", type=str, default=None, help="the arm every other is paired with (default: ce where it ran)")
    p.add_argument("--compare", type=str, action="append", default=[], help="ARM:REF: a paired difference "
                   "summary.md states on its own line, e.g. anchor:anchor_lam0; repeatable")
    p.add_argument("--val-only", action="store_true", help="train and rank on the validation slice; no test-set evaluation")
    p.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated integer seeds")
    p.add_argument("--out", type=str, required=True, help="the study's folder (rows, summary, runs); rerun with the same to continue")
    p.add_argument("--n", type=positive(int), default=2000, help="test images for --attacks (eval.py's fixed subset)")
    p.add_argument("--attacks", type=attack_list, default=["clean", "pgd20"], help="eval.py attacks on the --n images")
    p.add_argument("--aa-n", type=non_negative(int), default=500, help="AutoAttack on the first N of those images (0: none)")
    p.add_argument("--eval-batch-size", type=positive(int), default=500, help="eval.py --batch-size")
    p.add_argument("--eval-last", action="store_true",
                   help="also evaluate each run's last epoch (--attacks on the --n images), beside its best one")
    p.add_argument("--eps-sweep-seed", type=seed_type, default=None,
                   help="the runs of this seed also sweep eps (eval.py --eps-sweep) on the --aa-n images")
    p.add_argument("--summarize", action="store_true", help="only rewrite summary.md and summary.svg from rows.jsonl")
    args = p.parse_args(own)
    pairs = [c.split(":") for c in args.compare]
    bad = next((c for c, pair in zip(args.compare, pairs) if len(pair) != 2 or not all(pair) or pair[0] == pair[1]), None)
    if bad is not None:
        p.error(f"argument --compare: {bad!r} is not ARM:REF with two different arms, e.g. anchor:anchor_lam0")
    args.compare = [tuple(pair) for pair in pairs]
    typed = flag_names(own)
    if args.summarize:  # only the rows are read: any other flag would be silently ignored
        other = next((f for f in typed if f not in SUMMARY_FLAGS), "the train.py flags after --" if train_flags else None)
        if other:
            p.error(f"argument --summarize: rewrites the summary from rows.jsonl alone; drop {other} (only "
                    f"{', '.join(sorted(SUMMARY_FLAGS - {'--summarize'}))} apply)")
        return args
    if args.val_only:
        other = next((f for f in typed if f in EVAL_FLAGS), None)
        if other:
            p.error(f"argument {other}: --val-only evaluates nothing on the test set; drop {other} (give it to the "
                    "later invocation that evaluates)")
    args.arms = arms.define(args.losses, args.arm, args.grid)  # none: the stored ones, or the four losses
    args.only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only is not None else None
    try:
        args.seeds = [seed_type(s) for s in args.seeds.split(",")]
    except (ValueError, argparse.ArgumentTypeError):
        p.error(f"argument --seeds: {args.seeds!r} is not a comma-separated list of integers in [0, 2**32), e.g. 0,1,2")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"argument --seeds: {args.seeds} repeats a seed")
    if args.eps_sweep_seed is not None and not args.aa_n:
        p.error("argument --eps-sweep-seed: the sweep runs with AutoAttack on the --aa-n images; set --aa-n N > 0")
    if args.aa_n > args.n:
        p.error(f"argument --aa-n: {args.aa_n} is more than --n {args.n}; AutoAttack runs on a subset of those images")
    taken = [f for f in flag_names(train_flags) if f in arms.STUDY_FLAGS]
    if taken:
        p.error(f"train.py flag {taken[0]}: study.py sets --seed, --out and --resume itself; drop it")
    try:  # train.py's own parser judges the shared flags now, not hours into the grid
        args.train = train.get_args(train_flags + ["--seed", "0", "--out", "x.pt"])
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
    name = cpuinfo("model name") or platform.processor() or "unknown CPU"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def recipe(args):
    """What makes two invocations the same study (arms and seeds may grow; an arm keeps its flags). The test
    evaluation's settings count from the first invocation that evaluates: a validation-only sweep fixes none."""
    evaluation = {} if args.val_only else {"n": args.n, "attacks": args.attacks, "aa_n": args.aa_n,
                                           "eval_batch_size": args.eval_batch_size}  # random starts are drawn per batch
    if not args.val_only:  # recorded only where set, so that the studies from before these flags still match
        evaluation.update({"eval_last": True} if args.eval_last else {})
        evaluation.update({"eps_sweep_seed": args.eps_sweep_seed} if args.eps_sweep_seed is not None else {})
    return {"train_flags": args.train_flags, **evaluation}


def code_version():
    """The git commit of this checkout, and whether its tracked files differ from it (None outside git)."""
    try:
        run = lambda *cmd: subprocess.run(["git", "-C", HERE, *cmd], capture_output=True, text=True, timeout=10)
        commit = run("rev-parse", "HEAD")
        if commit.returncode:
            return None
        return {"commit": commit.stdout.strip(), "dirty": bool(run("status", "--porcelain", "-uno").stdout.strip())}
    except OSError:
        return None


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


def finished(ckpt, args, seed):
    """Whether the checkpoint at `ckpt` holds this run's last epoch, trained with these flags, and its log and
    best checkpoint are there (nothing left to train). Anything else, an unreadable file too, goes to train.py,
    which continues it or says what is wrong (a failed row)."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        recipe = {**resume.run_config(args), "seed": seed}
        return (state["step_in_epoch"] == 0 and state["epoch"] == args.epochs + args.finetune_epochs
                and all(state["config"]["train"].get(k) == v for k, v in recipe.items())
                and all(os.path.isfile(p) for p in resume.paths(ckpt).values() if not p.endswith(".svg")))
    except Exception:  # missing, a folder, truncated, not ours: train.py's message is the better one
        return False


def run_one(args, arm, seed, runs, data):
    """Train and evaluate one (arm, seed); -> its row. Files already there are continued, not redone: a finished
    checkpoint is not trained again, and an evaluation written after the best checkpoint is not repeated."""
    stem = os.path.join(runs, f"{arm}_s{seed}")
    ckpt, log = stem + ".pt", stem + ".console.log"
    files = resume.paths(ckpt)
    if not os.path.exists(ckpt):  # a first epoch cut short can leave a best checkpoint or log without the last one
        for p in files.values():
            if os.path.exists(p):
                os.remove(p)
    flags, parsed = args.arms[arm], args.parsed[arm]
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *args.train_flags, *flags, "--seed", str(seed),
           "--out", ckpt] + (["--resume"] if os.path.exists(ckpt) else [])
    failed = {"arm": arm, "loss": parsed.loss, "seed": seed, "status": "failed", "command": cmd}
    if not finished(ckpt, parsed, seed):
        code, last = Child.run(cmd, log)
        if Child.stopped:
            return None
        if code != 0:
            return {**failed, "stage": "train", "exit": code, "error": last}
    if not all(os.path.isfile(files[k]) for k in ("log", "best")):  # train.py said it finished, yet
        return {**failed, "stage": "train", "exit": 0, "error": f"{files['log']} or {files['best']} is missing"}
    history = [json.loads(line) for line in open(files["log"])]
    best_ckpt = torch.load(files["best"], map_location="cpu", weights_only=True)
    best = history[best_ckpt["epoch"] - 1]
    row = {"arm": arm, "loss": parsed.loss, "arm_flags": flags, "seed": seed, "status": "ok", "val_only": args.val_only,
           "best_epoch": best["epoch"], "val_clean": best["val_clean"], "val_pgd": best["val_pgd"],
           "n_val": best_ckpt["config"]["train"]["val"], "train_s": sum(r["s"] for r in history), "history": history,
           "command": cmd, "train_config": best_ckpt["config"]["train"], "eval_commands": [], "eval_s": 0.0,
           "accuracy": {}, "n": {}, "autoattack_stages": None}
    # (attacks, images, tag, checkpoint, extra flags): the best epoch's, AutoAttack's, the last epoch's
    sweep = ["--eps-sweep"] if seed == args.eps_sweep_seed else []
    evals = [] if args.val_only else [(args.attacks, args.n, "eval", files["best"], [])] + (
        [(["autoattack"], args.aa_n, "aa", files["best"], sweep)] if args.aa_n else []) + (
        [(args.attacks, args.n, "last", ckpt, [])] if args.eval_last else [])
    for attacks, n, tag, evaluated, extra in evals:
        out = f"{stem}.{tag}.json"
        cmd = [sys.executable, os.path.join(HERE, "eval.py"), evaluated, "--data", args.train.data, "--n", str(n),
               "--attacks", ",".join(attacks), "--batch-size", str(args.eval_batch_size), "--device",
               args.train.device, "--json", out, *extra]
        row["eval_commands"].append(cmd)
        fresh = os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(evaluated)
        if fresh and extra:  # written without the eps sweep now asked for: evaluate again
            with open(out) as f:
                fresh = "eps_sweep" in json.load(f)
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
            if name != "worst" and tag != "last":
                row["accuracy"][name], row["n"][name] = acc, result["n"]
            elif name != "worst":  # the last epoch's, apart: "last_clean", "last_pgd20"
                row["accuracy"][f"last_{name}"], row["n"][f"last_{name}"] = acc, result["n"]
        if "eps_sweep" in result:  # with the sweep's gradient-masking warning, if it fired
            row.update(eps_sweep=result["eps_sweep"], eval_warnings=result["warnings"])
        row.update(device=result["device"], torch=result["torch"])
        if result.get("autoattack_stages") is not None:  # from the AutoAttack evaluation only
            row["autoattack_stages"] = result["autoattack_stages"]
    # Bit-for-bit reruns need the same torch, data copy, CPU kernels and thread count (they change the rounding).
    row.update(data=data, threads=torch.get_num_threads(), cpu=cpu_name(), code=code_version())
    row.setdefault("torch", torch.__version__)  # validation-only rows: this process's, as their children's
    row.setdefault("device", args.train.device)
    return row


def hms(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def run_grid(args, grid, todo, rows_file, data):
    """Run the runs of `todo` (the unfinished part of `grid`) in turn, appending each row to `rows_file`; -> exit
    status, 128 + signal if one stopped it."""
    start, failures = time.time(), 0
    for i, (arm, seed) in enumerate(todo):
        if Child.stopped:  # a signal between two runs
            print("study interrupted; rerun the same command to continue")
            return 128 + Child.stopped
        eta = f"ETA {hms((time.time() - start) / i * (len(todo) - i))}" if i else "ETA after the first run"
        print(f"\n=== run {len(grid) - len(todo) + i + 1}/{len(grid)}: {arm} seed {seed} | elapsed "
              f"{hms(time.time() - start)} | {eta}", flush=True)
        row = run_one(args, arm, seed, os.path.join(args.out, "runs"), data)
        if row is None:  # a signal: the run saved where it was and continues on the next invocation
            print(f"study interrupted: {arm} seed {seed} saved; rerun the same command to continue")
            return 128 + Child.stopped
        append_row(rows_file, row)
        failures += row["status"] == "failed"
        if row["status"] == "failed":
            print(f"run {arm} seed {seed} FAILED in {row['stage']}: {row['error']} (recorded; the study goes on)")
        summarize(args.out, read_rows(rows_file), args.reference, args.compare)
    print(f"study done in {hms(time.time() - start)}: {len(todo) - failures} runs finished, {failures} failed; "
          f"see {os.path.join(args.out, 'summary.md')}")
    return 1 if failures else 0


def main(args):
    study_file, rows_file = os.path.join(args.out, "study.json"), os.path.join(args.out, "rows.jsonl")
    if args.summarize:
        if not os.path.exists(study_file):
            raise CLIError(f"{args.out} holds no study (no study.json); run the grid first")
        rows = read_rows(rows_file)
        ran = {arm_of(r) for r in rows if r["status"] == "ok"}
        missing = arms.missing_arm(args, ran)
        if missing:
            raise CLIError(f"{missing[0]}: {missing[1]} has no finished run in {args.out}; arms: {','.join(sorted(ran))}")
        summarize(args.out, rows, args.reference, args.compare)
        print(f"wrote {os.path.join(args.out, 'summary.md')} and summary.svg")
        return 0
    saved = json.load(open(study_file)) if os.path.exists(study_file) else {}
    if saved:
        # once the evaluation is fixed, its optional settings count when left out too (recipe records them if set)
        unset = {"eval_last": False, "eps_sweep_seed": None} if "n" in saved and not args.val_only else {}
        have = {**unset, **saved}
        diff = sorted(k for k, v in {**unset, **recipe(args)}.items() if k in have and have[k] != v)
        if diff:
            raise CLIError(f"{args.out} holds a study with other {', '.join(diff)} ({have.get(diff[0])}); rerun with "
                           "the same flags to continue it, or choose another --out")
    known = arms.settle(args, saved)  # every arm's flags judged by train.py, before any run
    fits = {(a.limit, a.val, a.batch_size): a for a in args.parsed.values()}
    for parsed in fits.values():  # --data, --limit, --val and --batch-size fit every arm, before any run
        train.training_data(parsed, download=True)  # fetched by the first, as train.py would
    data = data_copy(args.train.data, args.train.dataset)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    save_atomic_text(json.dumps({**saved, **recipe(args), "arms": known}, indent=2) + "\n", study_file)
    rows = read_rows(rows_file)
    done = {(arm_of(r), r["seed"]) for r in rows if r["status"] == "ok" and (args.val_only or not r.get("val_only"))}
    grid = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed by seed: early pairs to compare
    todo = [g for g in grid if g not in done]
    print(f"study {args.out}: {len(grid)} runs, {len(grid) - len(todo)} finished before, {len(todo)} to run"
          f"{' (validation only)' if args.val_only else ''}")
    with on_stop_signals(Child.forward):
        try:
            return run_grid(args, grid, todo, rows_file, data)
        finally:
            Child.stopped = None  # a next call from Python (the tests) starts unstopped


if __name__ == "__main__":
    cli(main, get_args, "study.py")
