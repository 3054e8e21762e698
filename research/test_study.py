"""study.py: a real tiny sweep (a failing run, Ctrl-C, resume, a later test evaluation), bad arguments, and the
aggregation arithmetic."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import study
import summary
from test_cli import TINY, assert_user_error, run_here
from test_data import make_cifar


def rows(out):
    return [json.loads(line) for line in open(out / "rows.jsonl")]


def test_sweep_fails_stops_resumes_then_test_evaluation_reuses_the_checkpoints(tmp_path, capsys):
    """A 2-arm grid over one flag as a user runs it, validation only: lam0's train.py fails (its checkpoint path is
    a folder) and the grid goes on; Ctrl-C during lam2 stops it cleanly; the rerun trains lam0 and continues lam2.
    Then the same study evaluates lam2 on the test set, training nothing again; a changed arm is refused."""
    make_cifar(tmp_path)
    out = tmp_path / "sweep"
    shared = ["--seeds", "0", "--out", out, "--", "--data", tmp_path, "--epochs", "3", *TINY]
    sweep = ["--grid", "lam=0,2", "--val-only", *shared]
    os.makedirs(out / "runs" / "lam0_s0.pt")  # lam0's checkpoint path is a folder: train.py refuses it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.py"), *map(str, sweep)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 60
    while not (out / "runs" / "lam2_s0.pt").exists() and time.time() < deadline:  # lam2's first epoch is saved
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)  # Ctrl-C: passed on to train.py once, which saves after its step
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in stdout, stdout
    assert "rerun the same command" in stdout
    [failed] = rows(out)  # the failure is recorded, the interrupted run is not
    assert (failed["arm"], failed["status"], failed["stage"]) == ("lam0", "failed", "train")
    assert "folder" in failed["error"]

    os.rmdir(out / "runs" / "lam0_s0.pt")
    r = run_here(study, *sweep, capsys=capsys)  # the rerun, in this process: faster
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 runs, 0 finished before, 2 to run (validation only)" in r.stdout and "eval.py" not in r.stdout
    console = open(out / "runs" / "lam2_s0.console.log").read()
    trains = [line for line in console.splitlines() if line.startswith("$ ") and "train.py" in line]
    assert len(trains) == 2 and "--resume" in trains[1] and "resuming" in console  # continued, not restarted
    val = rows(out)[1:]
    assert [(x["arm"], x["arm_flags"], x["val_only"], x["accuracy"]) for x in val] == [
        ("lam0", ["--lam", "0"], True, {}), ("lam2", ["--lam", "2"], True, {})]
    for row, lam in zip(val, (0, 2)):
        assert row["train_config"]["lam"] == lam and row["train_config"]["epochs"] == 3
        assert row["loss"] == row["train_config"]["loss"] == "anchor"
        assert row["best_epoch"] in range(1, 4) and len(row["history"]) == 3 and row["train_s"] > 0
        assert all(0 <= h["val_pgd"] <= h["val_clean"] <= 1 for h in row["history"])  # robust needs clean
        assert set(row["data"]["md5"]) >= {"data_batch_1", "test_batch"} and row["torch"] and row["cpu"]
        assert row["threads"] == 1  # the test runs on one thread (conftest.py), and so do the study's children
    assert val[0]["history"][0]["second"] > 0  # lam 0: the contrastive term is still measured
    assert json.loads((out / "study.json").read_text())["arms"] == {"lam0": ["--lam", "0"], "lam2": ["--lam", "2"]}
    md = (out / "summary.md").read_text()
    assert "## Validation ranking" in md and "failed in train" in md and " → " in md  # loss terms
    covered = md.split("range covered")[1].split("\n| lam2 |")[1].split("\n")[0]  # lam2's row: 3 epochs
    assert len([c for c in covered.split("|") if c.strip()]) == 3 and "twin's weight q" in md
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest itself was started in the background
    again = run_here(study, "--val-only", *shared, capsys=capsys)  # no arm named: the study's own
    assert again.returncode == 0 and "2 runs, 2 finished before, 0 to run" in again.stdout, again.stdout + again.stderr
    assert signal.getsignal(signal.SIGINT) is before  # study.main gave the handlers back

    best = out / "runs" / "lam2_s0.best.pt"
    kept = (best.stat().st_mtime_ns, best.read_bytes())
    test = ["--only", "lam2", "--n", "20", "--aa-n", "4", "--eval-last", "--eps-sweep-seed", "0", *shared]
    r = run_here(study, *test, capsys=capsys)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 runs, 0 finished before, 1 to run" in r.stdout and "train.py" not in r.stdout  # nothing trained
    assert (best.stat().st_mtime_ns, best.read_bytes()) == kept
    last = rows(out)[-1]
    assert (last["arm"], last["val_only"], last["val_pgd"]) == ("lam2", False, val[1]["val_pgd"])
    assert set(last["accuracy"]) == {"clean", "pgd20", "autoattack", "last_clean", "last_pgd20"}
    assert last["n"] == {"clean": 20, "pgd20": 20, "autoattack": 4, "last_clean": 20, "last_pgd20": 20}
    assert "runs/lam2_s0.pt" in " ".join(last["eval_commands"][-1])  # --eval-last: the last epoch's checkpoint
    assert [e for e, _ in last["eps_sweep"]][-1] == pytest.approx(32 / 255) and "eval_warnings" in last
    assert set(last["autoattack_stages"]) == {"apgd_ce", "apgd_t", "square"}  # from the second evaluation
    assert 0 <= last["accuracy"]["autoattack"] <= last["accuracy"]["clean"] <= 1
    md = (out / "summary.md").read_text()
    assert "## Test set" in md and "| lam2 | 1 |" in md and "PGD-20, last epoch" in md and "32/255" in md
    assert (out / "summary.svg").read_text().count("<circle") == 2 + 3  # val PGD of 2 runs, 3 test metrics of 1
    again = run_here(study, *test, capsys=capsys)
    assert again.returncode == 0 and "1 runs, 1 finished before, 0 to run" in again.stdout, again.stdout + again.stderr
    assert len(rows(out)) == 4  # nothing duplicated

    r = run_here(study, "--arm", "lam2=--lam 3", *test[2:], capsys=capsys)
    assert_user_error(r, "arm lam2", "--lam 2")
    r = run_here(study, *[f for f in test if f != "--eval-last"], capsys=capsys)  # left out: not silently dropped
    assert_user_error(r, "eval_last", "same flags")
    assert len(rows(out)) == 4


@pytest.mark.parametrize("flags,train_flags,words", [
    (["--losses", "ce,bogus"], [], ["--losses", "bogus"]),
    (["--losses", "ce,ce"], [], ["--losses"]),
    (["--seeds", "0,x"], [], ["--seeds", "integers"]), (["--seeds", "0,4294967296"], [], ["--seeds", "2**32"]),
    (["--val-only", "--n", "100"], [], ["--n", "--val-only", "drop --n"]),  # it would be ignored
    (["--val-only", "--eval-batch-size=64"], [], ["--eval-batch-size", "--val-only"]),
    (["--summarize", "--losses", "ce"], [], ["--summarize", "drop --losses"]),
    (["--summarize"], ["--epochs", "2"], ["--summarize", "train.py flags after --"]),
    (["--aa-n", "30", "--n", "20"], [], ["--aa-n"]),
    (["--val-only", "--eval-last"], [], ["--eval-last", "--val-only"]),
    (["--eps-sweep-seed", "0", "--aa-n", "0"], [], ["--eps-sweep-seed", "--aa-n"]),
    ([], ["--seed", "3"], ["--seed", "study.py sets"]),
    ([], ["--epochs", "0"], ["train.py flags", "--epochs"]),
    ([], ["--limit", "100000"], ["--limit"]),  # refused by train.py only once it reads the data: still up front
    (["--grid", "lam"], [], ["--grid", "FLAG=V,V"]), (["--grid", "lam="], [], ["--grid"]),
    (["--grid", "bogus=1,2"], [], ["arm bogus1", "bogus"]),  # train.py has no --bogus
    (["--grid", "lam=0,x"], [], ["arm lamx", "--lam"]),
    (["--arm", "lam0"], [], ["--arm", "NAME="]), (["--arm", "a b=--lam 0"], [], ["--arm", "name"]),
    (["--arm", 'x="--lam 0'], [], ["--arm"]),  # an unclosed quote
    (["--arm", "x=--lam 1", "--arm", "x=--lam 2"], [], ["defined twice"]),
    (["--grid", "beta=3"], ["--loss", "trades"], ["arm beta3", "TRADES's beta is --lam"]),  # a flag trades ignores
    (["--arm", "t=--loss ce --temperature 0.2"], [], ["arm t", "--temperature"]),
    (["--grid", "lam=0,1"], ["--lam", "2"], ["arm lam0", "--lam", "one place"]),
    (["--losses", "ce"], ["--loss", "anchor"], ["arm ce", "--loss", "one place"]),
    (["--only", "nope"], [], ["--only", "nope"]), (["--reference", "nope", "--losses", "ce"], [], ["--reference"]),
    (["--compare", "ce"], [], ["--compare", "ARM:REF"]), (["--compare", "ce:ce"], [], ["--compare", "two different"]),
    (["--losses", "ce,anchor", "--compare", "anchor:nope"], [], ["--compare", "nope", "not an arm"]),
    (["--arm", "nchw=--no-channels-last"], ["--channels-last"], ["arm nchw", "--channels-last", "one place"]),
    (["--arm", "d=--dataset cifar100"], [], ["arm d", "--dataset", "shared"]),
    (["--grid", "limit=40,100000"], [], ["--limit"]),  # an arm's data that do not fit, before any run
])
def test_bad_arguments_one_line_before_anything_runs(tmp_path, capsys, flags, train_flags, words):
    make_cifar(tmp_path)
    r = run_here(study, "--out", tmp_path / "s", *flags, "--", "--data", tmp_path, *TINY, *train_flags, capsys=capsys)
    assert_user_error(r, *words)
    assert not (tmp_path / "s" / "rows.jsonl").exists()


def test_other_recipe_in_the_same_folder_is_refused(tmp_path, capsys):
    make_cifar(tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"train_flags": ["--epochs", "9"], "n": 2000,
                                                          "attacks": ["clean", "pgd20"], "aa_n": 500}))
    r = run_here(study, "--out", tmp_path / "s", "--", "--data", tmp_path, *TINY, capsys=capsys)
    assert_user_error(r, "train_flags", "another --out")
    tiny = ["--data", str(tmp_path), *map(str, TINY)]  # the evaluation's batch size sets the attacks' random starts
    (tmp_path / "s" / "study.json").write_text(json.dumps({"train_flags": tiny, "n": 2000, "attacks": ["clean", "pgd20"],
                                                          "aa_n": 500, "eval_batch_size": 500}))
    r = run_here(study, "--out", tmp_path / "s", "--eval-batch-size", "250", "--", *tiny, capsys=capsys)
    assert_user_error(r, "eval_batch_size", "another --out")


def fake_row(loss, seed, clean, pgd, aa=None, status="ok", val_pgd=0.3):
    acc = {"clean": clean, "pgd20": pgd, **({"autoattack": aa} if aa is not None else {})}
    return {"loss": loss, "seed": seed, "status": status, "accuracy": acc, "best_epoch": 3, "val_clean": 0.5,
            "val_pgd": val_pgd, "n_val": 1000, "train_s": 600.0}


def test_aggregation_arithmetic(tmp_path):
    ce = [(0.50, 0.30), (0.52, 0.31), (0.54, 0.35)]
    anchor = [(0.53, 0.30), (0.54, 0.33), (0.58, 0.35)]  # clean differences 0.03, 0.02, 0.04
    all_rows = [fake_row("ce", s, *v) for s, v in enumerate(ce)] + [fake_row("anchor", s, *v) for s, v in enumerate(anchor)]
    all_rows.append({"loss": "trades", "seed": 0, "status": "failed", "stage": "eval", "error": "boom"})
    runs = summary.latest(all_rows[:6])
    mean, half, n = summary.paired(runs, "anchor", "ce", "clean")
    # the differences have mean 0.03 and standard deviation 0.01; t(2 df, 97.5%) = 4.303
    assert n == 3 and math.isclose(mean, 0.03) and math.isclose(half, 4.303 * 0.01 / math.sqrt(3))
    mean, half, n = summary.paired(runs, "anchor", "ce", "pgd20")  # differences 0, 0.02, 0: within the noise
    assert math.isclose(mean, 0.02 / 3) and half > abs(mean)
    assert summary.paired(runs, "anchor", "ce", "autoattack")[2] == 0  # not measured: no pairs

    (tmp_path / "study.json").write_text(json.dumps({"train_flags": ["--epochs", "3"], "n": 2000,
                                                     "attacks": ["clean", "pgd20"], "aa_n": 500}))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows) + '{"cut short')
    summary.summarize(str(tmp_path), study.read_rows(str(tmp_path / "rows.jsonl")))
    md = (tmp_path / "summary.md").read_text()
    assert "| ce | 3 | 52.0 ± 2.0 | 32.0 ± 2.6 | – |" in md  # sd of 30, 31, 35 is 2.65
    assert "| anchor − ce | +3.0 [+0.5, +5.5] * | +0.7 [" in md  # 3.0 ± 4.303 * 1.0 / sqrt(3) = 3.0 ± 2.5
    assert md.index("| ce |") < md.index("| anchor |")  # the baseline first
    assert "| trades | 0 | failed | failed in eval: boom |" in md and "## Comparisons" not in md
    summary.summarize(str(tmp_path), study.read_rows(str(tmp_path / "rows.jsonl")), compare=[("anchor", "ce")])
    md = (tmp_path / "summary.md").read_text()  # a named pair: validation (equal here) and test metrics
    assert ("| anchor − ce | +0.0 (no spread over 3 seeds) | +0.0 (no spread over 3 seeds) | +3.0 [+0.5, +5.5] * | "
            "+0.7 [") in md[md.index("## Comparisons"):]
    assert (tmp_path / "summary.svg").read_text().count("<circle") == 18  # 6 runs x (val PGD, clean, PGD-20)
    study.append_row(str(tmp_path / "rows.jsonl"), fake_row("supcon", 0, 0.5, 0.3))  # after the line cut short
    assert [r["loss"] for r in study.read_rows(str(tmp_path / "rows.jsonl"))][-2:] == ["trades", "supcon"]


def test_arm_names_of_losses_and_of_fractions():
    args = study.get_args(["--losses", "anchor,ce", "--out", "x", "--", "--device", "cpu"])  # the short form
    assert args.arms == {"anchor": ["--loss", "anchor"], "ce": ["--loss", "ce"]}
    args = study.get_args(["--grid", "eps=4/255,8/255", "--out", "x", "--", "--device", "cpu"])
    assert args.arms == {"eps4_255": ["--eps", "4/255"], "eps8_255": ["--eps", "8/255"]}


def test_validation_ranking_and_its_noise(tmp_path, capsys):
    """Val-only rows rank by mean val PGD; a test-evaluated row of the same run replaces its val-only row."""
    rows = [{**fake_row("ce", s, None, None, val_pgd=v), "arm": "ce", "accuracy": {}, "val_only": True}
            for s, v in enumerate([0.30, 0.32])]
    rows += [{**fake_row("anchor", s, None, None, val_pgd=v), "arm": "lam3", "accuracy": {}, "val_only": True}
             for s, v in enumerate([0.33, 0.36])]
    rows.append({**fake_row("ce", 0, 0.5, 0.25), "arm": "ce", "val_only": False})  # seed 0 later on the test set
    (tmp_path / "study.json").write_text(json.dumps({"train_flags": [], "n": 20, "attacks": ["clean"], "aa_n": 0,
                                                     "arms": {"ce": ["--loss", "ce"], "lam3": ["--lam", "3"]}}))
    runs = summary.latest(rows)
    assert not runs[("ce", 0)]["val_only"] and runs[("ce", 1)]["val_only"]
    mean, half, n = summary.paired(runs, "lam3", "ce", "val_pgd")  # differences 0.03 and 0.04
    assert n == 2 and math.isclose(mean, 0.035) and math.isclose(half, 12.706 * math.sqrt(0.00005) / math.sqrt(2))
    summary.summarize(str(tmp_path), rows)
    md = (tmp_path / "summary.md").read_text()
    ranking = md[md.index("## Validation ranking"):]
    assert ranking.index("| 1 | lam3 |") < ranking.index("| 2 | ce |") and "`--lam 3`" in ranking
    assert "+3.5 [" in ranking and "(reference)" in ranking
    p = (0.30 + 0.32 + 0.33 + 0.36) / 4  # the binomial standard error of one run's val PGD on 1000 images
    assert f"standard error of {100 * math.sqrt(p * (1 - p) / 1000):.1f} points" in ranking
    assert "## Test set" in md and "| ce | 1 | 50.0 |" in md  # only the evaluated run
    every = md[md.index("## Every run"):]
    assert every.count("| ce | 0 |") == 1 and "| ce | 0 | ok | 3 | 50.0 | 30.0 | 50.0 | 25.0 |" in every  # once, tested
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_user_error(run_here(study, "--out", tmp_path, "--summarize", "--reference", "nope", capsys=capsys),
                      "--reference", "nope")
    assert run_here(study, "--out", tmp_path, "--summarize", "--reference", "lam3", capsys=capsys).returncode == 0
    assert "val PGD − lam3" in (tmp_path / "summary.md").read_text()
    assert_user_error(run_here(study, "--out", tmp_path, "--summarize", "--compare", "lam3:nope", capsys=capsys),
                      "--compare", "nope")
    assert run_here(study, "--out", tmp_path, "--summarize", "--compare", "lam3:ce", capsys=capsys).returncode == 0
    md = (tmp_path / "summary.md").read_text()
    assert "| lam3 − ce | +0.0 (no spread over 2 seeds) | +3.5 [" in md[md.index("## Comparisons"):]


def test_a_finished_checkpoint_is_reused_only_for_its_own_recipe(tmp_path):
    """study.py skips train.py for a run at its last epoch only when the checkpoint's recipe, seed and files match;
    anything else goes to train.py, which continues it or refuses it (a failed row)."""
    args = study.arms.check("a", ["--lam", "2"], ["--epochs", "3", *TINY])
    ckpt = tmp_path / "a_s1.pt"
    torch.save({"epoch": 3, "step_in_epoch": 0, "config": {"train": {**study.resume.run_config(args), "seed": 1}}}, ckpt)
    for p in (tmp_path / "a_s1.best.pt", tmp_path / "a_s1.jsonl"):
        p.write_text("")
    assert study.finished(str(ckpt), args, 1)
    assert not study.finished(str(ckpt), args, 2)  # another seed
    assert not study.finished(str(ckpt), study.arms.check("a", ["--lam", "3"], ["--epochs", "3", *TINY]), 1)
    assert not study.finished(str(ckpt), study.arms.check("a", ["--lam", "2"], ["--epochs", "4", *TINY]), 1)
    (tmp_path / "a_s1.jsonl").unlink()
    assert not study.finished(str(ckpt), args, 1)  # its log is missing


def test_missing_data_without_network(tmp_path, capsys):
    """study.py fetches missing data as train.py would, and says what a user of the CLI can do."""
    r = run_here(study, "--out", tmp_path / "s", "--", "--data", tmp_path / "nowhere", *TINY, capsys=capsys)
    assert_user_error(r, "by hand", "--data")
    assert "download=True" not in r.stderr and not (tmp_path / "s").exists()
