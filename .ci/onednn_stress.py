"""Stress check for issue 26 (oneDNN's AVX2 channels-last kernels crash at small widths). Not part of the pytest suite.

Runs train.py and eval.py as users do, each as a subprocess under ONEDNN_MAX_CPU_ISA=AVX2 (which reproduces an
AVX2-only CPU on an AVX-512 one), for every width x OMP_NUM_THREADS x layout, on tiny CIFAR-10 files in the
official format made in a temp dir (test_data.make_cifar), and prints a table of tries and crashes. A crash is any
run that does not exit 0: a signal (SIGSEGV, SIGABRT from "double free or corruption"), an error exit, or a hang
(killed after --timeout seconds).

    python .ci/onednn_stress.py                        # default: 2 tries of everything (64 runs, ~6-11 min
                                                       # on 2 busy cores; width 64's evals are most of it)
    python .ci/onednn_stress.py --widths 4,8 --tries 3  # the failing width and its neighbour: ~2 min
    python .ci/onednn_stress.py --tries 5 --json /tmp/stress.json
    python .ci/onednn_stress.py --widths 4 --threads 1 --isa ''   # native ISA (AVX-512 here): the control

Paths:
  train  train.py --epochs 1 --width W --val 20 --limit 64 --batch-size 32 --steps 2 --loss anchor --device cpu,
         with --channels-last (cl) or --no-channels-last (nchw). The anchor loss's joint pass runs 2 x 32 = 64
         images through the model, forward and backward (input and weight gradients).
  eval   eval.py CKPT --n 20 --attacks clean,pgd20 --device cpu, as it is (layout "as-is": NCHW on the CPU since
         eval.py follows train.py's rule), on a checkpoint from the width's nchw training run.
  eval   the same, with the model forced to channels-last by a wrapper (layout "cl-forced": eval.py itself has
         no layout flag; the wrapper converts the model when eval.py calls .eval() on it). The attacks take
         input gradients only (torch.autograd.grad on the input), no weight gradients.

Exit status: 0 when no run failed, 1 otherwise (so the check can gate something if wanted).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# eval.py with its model converted to channels-last: eval.py loads the model and calls .eval() on it, so
# nn.Module.eval is wrapped to convert the top-level module (the one it is called on) as well.
EVAL_CL = """
import os, runpy, sys, torch
sys.path.insert(0, os.getcwd())  # the project root (cwd): eval.py's imports
_eval = torch.nn.Module.eval
def eval_cl(self):
    _eval(self)
    return self.to(memory_format=torch.channels_last)
torch.nn.Module.eval = eval_cl
sys.argv = ["eval.py"] + sys.argv[1:]
runpy.run_path("eval.py", run_name="__main__")
"""


def run(cmd, env, timeout, log):
    """(status, seconds): status 'ok', 'SIGSEGV'/'SIGABRT'/..., 'exit N' or 'hang'."""
    t = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session): only what we started
            proc.wait()
            return "hang", time.monotonic() - t
    if rc == 0:
        return "ok", time.monotonic() - t
    if rc < 0:
        try:
            return signal.Signals(-rc).name, time.monotonic() - t
        except ValueError:
            return f"signal {-rc}", time.monotonic() - t
    return f"exit {rc}", time.monotonic() - t


def last_line(log):
    try:
        with open(log, "rb") as f:
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):  # the C library's message, else the last line
        if "corruption" in ln or "free()" in ln or "Fatal Python error" in ln:
            return ln[:160]
    return lines[-1][:160] if lines else ""


def main():
    p = argparse.ArgumentParser(description="issue 26 stress check: train.py / eval.py under ONEDNN_MAX_CPU_ISA=AVX2")
    p.add_argument("--tries", type=int, default=2, help="runs of each combination (default 2)")
    p.add_argument("--widths", default="4,8,16,64", help="model widths (comma-separated)")
    p.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values (comma-separated)")
    p.add_argument("--paths", default="train,eval", help="train, eval or both")
    p.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA ('' = the CPU's own, the control)")
    p.add_argument("--timeout", type=float, default=30,
                   help="seconds per run at widths <= 16 (x width/16 above); a run past it is a hang (default 30; "
                   "a normal run takes 2-4 s there, ~13 s train / ~26 s eval at width 64 on 1 thread)")
    p.add_argument("--eval-layouts", default="as-is,cl-forced", help="which eval variants to run (comma-separated)")
    p.add_argument("--json", metavar="PATH", help="also write the table and every run's status here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data, checkpoints, logs) and print it")
    a = p.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    paths = a.paths.split(",")

    sys.path.insert(0, ROOT)
    from test_data import make_cifar  # tiny CIFAR-10 (5 x 20 training, 20 test images), official format

    tmp = tempfile.mkdtemp(prefix="onednn_stress_")
    data_dir = os.path.join(tmp, "data")
    make_cifar(data_dir)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_", "OMP_", "MKL_"))}
    base_env["PYTHONFAULTHANDLER"] = "1"  # a Python traceback in the log on SIGSEGV / SIGABRT
    if a.isa:
        base_env["ONEDNN_MAX_CPU_ISA"] = a.isa
    print(f"tmp {tmp}; ONEDNN_MAX_CPU_ISA={a.isa or '(native)'}; tries {a.tries}; widths {widths}; "
          f"threads {threads}; paths {paths}", flush=True)

    rows, runs = [], []
    for w in widths:
        timeout = a.timeout * max(1.0, w / 16)
        ckpt = None  # for eval: the first checkpoint an nchw training run of this width wrote
        for t in threads:
            env = dict(base_env, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t))
            combos = []
            if "train" in paths:
                combos += [("train", "nchw"), ("train", "cl")]  # nchw first: its checkpoint feeds eval
            if "eval" in paths:
                combos += [("eval", lay) for lay in a.eval_layouts.split(",")]
            for path, layout in combos:
                statuses = []
                for i in range(a.tries):
                    tag = f"w{w}_t{t}_{path}_{layout}_{i}"
                    log = os.path.join(tmp, tag + ".log")
                    if path == "train":
                        out = os.path.join(tmp, tag + ".pt")
                        cmd = [sys.executable, "train.py", "--data", data_dir, "--epochs", "1", "--width", str(w),
                               "--val", "20", "--limit", "64", "--batch-size", "32", "--steps", "2",
                               "--loss", "anchor", "--device", "cpu", "--out", out,
                               "--channels-last" if layout == "cl" else "--no-channels-last"]
                    else:
                        if ckpt is None:  # no nchw training run of this width succeeded (or train not run)
                            ckpt = os.path.join(tmp, f"w{w}_ckpt.pt")
                            st, _ = run([sys.executable, "train.py", "--data", data_dir, "--epochs", "1",
                                         "--width", str(w), "--val", "20", "--limit", "64", "--batch-size", "32",
                                         "--steps", "2", "--device", "cpu", "--no-channels-last", "--out", ckpt],
                                        dict(base_env, ONEDNN_MAX_CPU_ISA="SSE41", OMP_NUM_THREADS="1"),
                                        timeout, os.path.join(tmp, f"w{w}_ckpt.log"))
                            if st != "ok":
                                print(f"  could not make a width-{w} checkpoint for eval ({st})", flush=True)
                        args = [ckpt, "--data", data_dir, "--n", "20", "--attacks", "clean,pgd20", "--device", "cpu",
                                "--json", os.path.join(tmp, tag + ".json")]
                        cmd = ([sys.executable, "eval.py"] if layout == "as-is" else
                               [sys.executable, "-c", EVAL_CL]) + args
                    st, secs = run(cmd, env, timeout, log)
                    if path == "train" and layout == "nchw" and st == "ok" and ckpt is None:
                        ckpt = out
                    statuses.append(st)
                    runs.append({"width": w, "threads": t, "layout": layout, "path": path, "try": i,
                                 "status": st, "seconds": round(secs, 1),
                                 "message": "" if st == "ok" else last_line(log)})
                    print(f"  {tag:<28} {st:<8} {secs:6.1f}s  {runs[-1]['message']}", flush=True)
                bad = [s for s in statuses if s != "ok"]
                kinds = ", ".join(f"{k} x{bad.count(k)}" for k in sorted(set(bad)))
                rows.append({"width": w, "threads": t, "layout": layout, "path": path, "tries": a.tries,
                             "crashes": len(bad), "how": kinds})

    print(f"\nONEDNN_MAX_CPU_ISA={a.isa or '(native)'}")
    head = f"{'width':>5} {'threads':>7} {'layout':<9} {'path':<5} {'tries':>5} {'crashes':>7}  how"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['width']:>5} {r['threads']:>7} {r['layout']:<9} {r['path']:<5} {r['tries']:>5} {r['crashes']:>7}  {r['how']}")
    failed = sum(r["crashes"] for r in rows)
    print(f"{failed} of {sum(r['tries'] for r in rows)} runs failed")
    if a.json:
        import torch  # only for the versions, in this (parent) process
        with open(a.json, "w") as f:
            json.dump({"isa": a.isa, "torch": torch.__version__, "tries": a.tries, "table": rows, "runs": runs}, f,
                      indent=1)
        print(f"wrote {a.json}")
    if a.keep:
        print(f"kept {tmp}")
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
