"""End-to-end tests of train.py and eval.py as users run them (subprocesses on a tiny data set in the official
format), resume equivalence, and the bad-input cases: one line on stderr, exit status 2, nothing lost."""
import copy
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as eval_cli
import resume
import step
import train
from attacks import apgd, cw_l2, fgsm, pgd, square
import cli
from cli import CLIError, json_safe
from conftest import synthetic_images
from test_data import make_cifar

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--width", "4", "--val", "20", "--limit", "64", "--batch-size", "32", "--steps", "2", "--device", "cpu"]


def run(script, *args, timeout=120, **env):
    """Run a CLI with no network: any download goes to a closed loopback proxy and fails at once."""
    environ = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=environ, cwd=HERE)


def run_here(module, *args, capsys):
    """The CLI's own entry point in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_:
        module.cli(module.main, lambda: module.get_args([str(a) for a in args]), module.__name__ + ".py")
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_.value.code, out.out, out.err)


def md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real training run of 1 epoch (the module's tests read its outputs)."""
    root = tmp_path_factory.mktemp("e2e")
    make_cifar(root)
    out = root / "run" / "ckpt.pt"  # a folder that does not exist yet
    r = run("train.py", "--data", root, "--epochs", "1", "--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    return root, out, r.stdout


def strict(name):
    raise AssertionError(f"{name} in a JSON file: not strict JSON")


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr  # progress lines may precede it
    for word in words:
        assert word in r.stderr, r.stderr


def test_train_writes_checkpoint_log_plot(trained):
    root, out, stdout = trained
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "epoch", "config", "metrics"} and ckpt["epoch"] == 1
    assert ckpt["config"]["train"]["loss"] == "anchor" and ckpt["config"]["model"]["width"] == 4
    best = torch.load(root / "run" / "ckpt.best.pt", weights_only=True)
    assert best["epoch"] == 1
    rows = [json.loads(line, parse_constant=strict) for line in open(root / "run" / "ckpt.jsonl")]
    assert len(rows) == 1 and 0 <= rows[0]["val_pgd"] <= rows[0]["val_clean"] <= 1 and rows[0]["loss"] > 0
    svg = (root / "run" / "ckpt.svg").read_text()
    assert svg.startswith("<svg") and "polyline" in svg and svg.rstrip().endswith("</svg>")
    assert "val_pgd" in stdout and "saved" in stdout


def test_eval_json(trained, tmp_path, monkeypatch, capsys):
    """The default attacks through the CLI's entry point, Square at 500 of its 5,000 queries (for time: the
    1-epoch model keeps an image robust, and Square would spend its whole budget on it)."""
    root, out, _ = trained
    short = (lambda m, x, y, eps, alpha, seed: square(m, x, y, eps, 500, seed=seed), 501)
    monkeypatch.setitem(eval_cli.ATTACKS, "square", short)
    j = tmp_path / "eval.json"
    r = run_here(eval_cli, out, "--data", root, "--n", 20, "--device", "cpu", "--json", j, "--eps-sweep",
                 capsys=capsys)
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text(), parse_constant=strict)
    acc = result["accuracy"]
    assert result["n"] == 20 and result["eps"] == pytest.approx(8 / 255) and result["loss"] == "anchor"
    assert set(acc) == {"clean", "fgsm", "pgd20", "cw_inf", "autoattack", "worst"}
    assert all(0 <= a <= 1 for a in acc.values())
    assert set(result["per_class"]) == set(acc) and all(len(c) == 10 for c in result["per_class"].values())
    worst = [a for a in result["per_class"]["worst"] if a is not None]  # null: a class without test images
    assert f"weakest class" in r.stdout and f"{min(worst):.4f}" in r.stdout and f"{max(worst):.4f}" in r.stdout
    stages = result["autoattack_stages"]  # robust after APGD-CE, then APGD-T, then Square: never rising
    assert list(stages) == ["apgd_ce", "apgd_t", "square"] and acc["clean"] >= stages["apgd_ce"] >= \
        stages["apgd_t"] >= stages["square"] == acc["autoattack"]
    assert acc["worst"] <= min(v for k, v in acc.items() if k != "worst")
    assert max(acc.values()) == acc["clean"]  # attacks start from the images classified correctly
    assert acc["worst"] * 20 == pytest.approx(round(acc["worst"] * 20))  # a count of images
    sweep = result["eps_sweep"]
    assert sweep[0] == [0, acc["clean"]] and all(b[1] <= a[1] + 0.1 for a, b in zip(sweep, sweep[1:]))
    assert os.path.exists(str(j).rsplit(".", 1)[0] + ".eps_sweep.svg")
    rep = result["representation"]
    assert -1 <= rep["inter_class_cos"] <= 1 and -1 <= rep["clean_adv_cos"] <= 1
    for name in ("clean", "autoattack", "apgd_t", "square", "worst"):
        assert name in r.stdout


def test_eval_bf16_on_the_cpu(trained, tmp_path, capsys):
    """eval.py --amp on the CPU: the attacks run under bf16 autocast, and the JSON says so."""
    root, out, _ = trained
    j = tmp_path / "bf16.json"
    r = run_here(eval_cli, out, "--data", root, "--n", "10", "--attacks", "clean,pgd20", "--amp", "--device", "cpu",
                 "--json", j, capsys=capsys)
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text())
    assert result["precision"] == "bf16" and "bf16" in r.stdout
    assert 0 <= result["accuracy"]["pgd20"] <= result["accuracy"]["clean"] <= 1


def test_eps_sweep_warning_reaches_the_json(trained, tmp_path, monkeypatch, capsys):
    root, out, _ = trained
    monkeypatch.setattr(eval_cli, "eps_sweep", lambda model, x, y, args: [[0.0, 0.6], [32 / 255, 0.2]])
    j = tmp_path / "e.json"
    r = run_here(eval_cli, out, "--data", root, "--n", 10, "--attacks", "clean", "--device", "cpu", "--json", j,
                 "--eps-sweep", capsys=capsys)
    assert r.returncode == 0, r.stderr
    [warning] = json.loads(j.read_text())["warnings"]
    assert "20.0% accuracy remains at eps 32/255" in warning and f"warning: {warning}" in r.stdout


def test_eval_subset_and_cw_l2_json_equals_robustness(trained, tmp_path, monkeypatch, capsys):
    """--n 10 and cw_l2 in the JSON; the JSON holds robustness()'s dict as it is, for the model and images the
    CLI loads (the CLI adds its metadata only)."""
    root, out, _ = trained
    monkeypatch.setattr(eval_cli, "cw_l2", lambda m, x, y: cw_l2(m, x, y, steps=5, search_steps=2))  # for time
    j = tmp_path / "sub.json"
    argv = [out, "--data", root, "--n", 10, "--attacks", "clean,apgd-ce,cw_l2", "--device", "cpu"]
    r = run_here(eval_cli, *argv, "--json", j, capsys=capsys)
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text(), parse_constant=strict)
    assert set(result["accuracy"]) == {"clean", "apgd_ce", "worst"}
    cw = result["cw_l2"]
    assert cw["attacked"] == round(result["accuracy"]["clean"] * 10)
    assert 0 <= cw["success_rate"] <= 1 if cw["attacked"] else cw["success_rate"] is None
    _, model, x, y = eval_cli.load(eval_cli.get_args([str(a) for a in argv]))
    direct = eval_cli.robustness(model, x, y, ["clean", "apgd_ce", "cw_l2"], progress=False)
    assert len(x) == 10 and {"accuracy", "per_class", "warnings", "cw_l2", "representation"} <= set(direct)
    assert {k: result[k] for k in direct} == json.loads(json.dumps(json_safe(direct)))


# channels-last at width 8: at width 4 oneDNN's AVX2 NHWC kernel for the 4-channel 1x1 stride-2 shortcut's weight
# gradient corrupts memory (docs/speed.md, "The CPU layout"), and .ci/run runs this file under ONEDNN_MAX_CPU_ISA=AVX2
@pytest.mark.parametrize("layout", [[], ["--channels-last", "--width", "8"], ["--amp"]], ids=["nchw", "nhwc", "bf16"])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys, layout):
    """Ctrl-C mid-epoch, then the resume command train.py prints: the same weights as a run never stopped (CPU,
    fixed seed). It names no flag but --out and --data, so the checkpoint gives the memory layout too (NHWC and NCHW
    round differently)."""
    data = tmp_path / "my data"  # not ./data, and a space: the printed command must name it, quoted
    make_cifar(data)
    common = ["--data", str(data), "--epochs", "2", "--finetune-epochs", "1", "--loss", "anchor", *TINY, *layout]
    assert train.main(train.get_args(common + ["--out", str(tmp_path / "a.pt")])) == 0

    real_batches = train.batches
    def interrupted(*args, **kwargs):  # Ctrl-C after the first step of the second epoch
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if kwargs.get("shuffle_seed", 0) % 100003 == 1 and i == 0:
                signal.raise_signal(signal.SIGINT)
            yield batch
    monkeypatch.setattr(train, "batches", interrupted)
    assert train.main(train.get_args(common + ["--out", str(tmp_path / "b.pt")])) == 130
    stopped = torch.load(tmp_path / "b.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 1)
    [printed] = [line for line in capsys.readouterr().out.splitlines() if "continue with: " in line]
    command = shlex.split(printed.split("continue with: ")[1])
    assert command[:2] == ["python", "train.py"] and "--data" in command, printed
    assert command[command.index("--data") + 1] == str(data) and command[command.index("--out") + 1] == \
        str(tmp_path / "b.pt")
    monkeypatch.setattr(train, "batches", real_batches)
    assert train.main(train.get_args(command[2:])) == 0

    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"]["history"][-1]["val_pgd"] == b["metrics"]["history"][-1]["val_pgd"]


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    make_cifar(tmp_path)
    out = tmp_path / "c.pt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--data", str(tmp_path), "--epochs",
                          "200", "--out", str(out), *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=HERE)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:  # after the first epoch's checkpoint
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr
    assert "--resume" in stdout
    assert torch.load(out, weights_only=True)["epoch"] >= 1


def test_resume_command_under_torchrun():
    """The torchrun form names the process count and the runtime flags --resume does not restore: --data, and
    --sync-bn where it was on (it changes the training)."""
    args = train.get_args(["--data", "my data", "--out", "runs/a b.pt", "--sync-bn", "--device", "cpu"])
    assert shlex.split(train.resume_command(args, 4)) == ["torchrun", "--nproc_per_node", "4", "train.py", "--resume",
                                                         "--out", "runs/a b.pt", "--data", "my data", "--sync-bn"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_second_ctrl_c_stops_at_once_in_one_line(tmp_path, monkeypatch, capsys, signum):
    """Ctrl-C (or SIGTERM) twice before the first step ends: no checkpoint, exit status 128 + the signal, and one
    line on stderr saying so (no traceback)."""
    make_cifar(tmp_path)
    out = tmp_path / "twice.pt"
    real_batches = train.batches

    def twice(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            signal.raise_signal(signum)  # the handler runs inside raise_signal: the second one raises here
            signal.raise_signal(signum)
            yield batch
    monkeypatch.setattr(train, "batches", twice)
    try:
        r = run_here(train, "--data", tmp_path, "--epochs", 1, "--out", out, *TINY, capsys=capsys)
    except KeyboardInterrupt:  # caught here, or pytest would take it for the user's Ctrl-C and stop the session
        pytest.fail("a second Ctrl-C escaped train.py's cli() as a KeyboardInterrupt")
    assert r.returncode == 128 + signum and "saving after this step" in r.stdout
    assert r.stderr.splitlines() == [f"train.py: interrupted again: stopped without saving; nothing was saved to {out}"]
    assert not out.exists()


def test_plain_ctrl_c_is_one_line(capsys):
    """A Ctrl-C where no handler saves (eval.py, say): "interrupted", exit 130, no traceback."""
    def main(args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as exit_:
        cli.cli(main, lambda: None, "eval.py")
    assert exit_.value.code == 130 and capsys.readouterr().err == "eval.py: interrupted\n"


def test_resume_of_a_finished_run_says_so_and_writes_nothing(trained, capsys):
    root, out, _ = trained
    files = [str(out), *resume.paths(str(out)).values()]
    before = {f: (md5(f), os.stat(f).st_mtime_ns) for f in files}
    r = run_here(train, "--resume", "--out", out, "--data", root, capsys=capsys)
    assert r.returncode == 0 and r.stderr == "" and "saved" not in r.stdout
    assert f"{out} is a finished run (epoch 1 of 1)" in r.stdout and "new --out" in r.stdout
    assert {f: (md5(f), os.stat(f).st_mtime_ns) for f in files} == before  # not even the plot is redrawn


def test_non_finite_loss_stops_with_a_message(tmp_path, capsys):
    make_cifar(tmp_path)
    r = run_here(train, "--data", tmp_path, "--epochs", "2", "--lr", "1e30", "--out", tmp_path / "n.pt", *TINY,
                 capsys=capsys)
    assert_user_error(r, "non-finite", "--lr")
    assert not (tmp_path / "n.pt").exists()


def test_existing_checkpoint_is_never_overwritten(trained, capsys):
    root, out, _ = trained
    before = md5(out)
    r = run("train.py", "--data", root, "--epochs", "1", "--out", out, *TINY)  # the real CLI, once
    assert_user_error(r, "exists", "--resume")
    assert md5(out) == before
    r = run_here(train, "--data", root, "--resume", "--lr", "0.5", "--out", out, *TINY, capsys=capsys)
    assert_user_error(r, "--lr")
    assert md5(out) == before
    # the files beside a checkpoint are a run's too: a new run never overwrites its best checkpoint or log
    best = root / "run" / "ckpt.best.pt"
    r = run_here(train, "--data", root, "--epochs", "1", "--out", root / "run" / "ckpt.pt.moved", *TINY, capsys=capsys)
    assert r.returncode == 0  # a fresh name is fine
    before_best = md5(best)
    out.rename(root / "run" / "gone.pt")
    try:
        r = run_here(train, "--data", root, "--epochs", "1", "--out", out, *TINY, capsys=capsys)
        assert_user_error(r, "ckpt.best.pt", "exists")
        assert md5(best) == before_best
    finally:
        (root / "run" / "gone.pt").rename(out)
    for folder in (root / "run", f"{root / 'new'}{os.sep}", ""):  # an existing folder, a folder's name, nothing
        assert_user_error(run_here(train, "--data", root, "--out", folder, *TINY, capsys=capsys), "--out", "folder")
    assert_user_error(run_here(train, "--data", root, "--seed", 2**32, *TINY, capsys=capsys), "--seed", "2**32")


@pytest.mark.parametrize("flags,words", [
    (["--eps", "-0.1"], ["--eps"]), (["--eps", "abc"], ["--eps"]), (["--steps", "0"], ["--steps"]),
    (["--batch-size", "0"], ["--batch-size"]), (["--loss", "bogus"], ["--loss"]), (["--val", "-1"], ["--val"]),
    (["--limit", "100000"], ["--limit"]), (["--batch-size", "4096"], ["--batch-size"]),
    (["--beta", "-1"], ["--beta"]), (["--device", "tpu"], ["--device"]), (["--alpha", "0"], ["--alpha"]),
    (["--wd", "-1"], ["--wd"]), (["--beta", "nan"], ["--beta"]), (["--lam", "nan"], ["--lam"]),
    (["--lr", "inf"], ["--lr"]), (["--epochs", "0"], ["--epochs"]),
    # a flag the loss does not use is refused, not ignored
    (["--loss", "trades", "--beta", "1"], ["--beta", "TRADES's beta is --lam"]),
    (["--loss", "trades", "--temperature", "0.2"], ["--temperature", "does not use"]),
    (["--loss", "ce", "--temperature", "0.2"], ["--temperature"]), (["--loss", "ce", "--beta=2"], ["--beta"]),
    (["--loss", "ce", "--lam", "2"], ["--lam"]), (["--loss", "supcon", "--beta", "0.5"], ["--beta", "supcon"]),
    (["--loss", "trades", "--adv-view", "second"], ["--adv-view"]),
])
def test_train_bad_flags(trained, tmp_path, capsys, flags, words):
    root, _, _ = trained
    r = run_here(train, "--data", root, "--out", tmp_path / "x.pt", *TINY, *flags, capsys=capsys)
    assert_user_error(r, *words)
    assert not (tmp_path / "x.pt").exists()


def test_missing_data_without_network(tmp_path, capsys):
    r = run("train.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "x.pt", *TINY)
    assert_user_error(r, "by hand", "--data")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "nowhere").exists()  # no empty folder left behind


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    cli.save_atomic({"epoch": 1}, path)

    def interrupted(obj, f):  # a second Ctrl-C (or a full disk) in the middle of the write
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        cli.save_atomic({"epoch": 2}, path, write=interrupted)
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == ["ckpt.pt"]
    cli.save_atomic_text("é\n", path)
    assert open(path, encoding="utf-8").read() == "é\n" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_eval_bad_checkpoints(trained, tmp_path, capsys):
    root, out, _ = trained
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(out.read_bytes()[:1000])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    odd = tmp_path / "odd.pt"  # the right keys, the wrong types inside
    torch.save({"model": {}, "config": {"model": "resnet18"}, "epoch": 1}, odd)
    other_arch = tmp_path / "other.pt"
    ckpt = torch.load(out, weights_only=True)
    ckpt["config"]["model"]["width"] = 8  # the weights are width 4
    torch.save(ckpt, other_arch)
    untyped = tmp_path / "untyped.pt"  # model weights that are not a state dict
    torch.save({**ckpt, "model": torch.zeros(3)}, untyped)
    mismatched = tmp_path / "mismatched.pt"  # a 10-class model that names CIFAR-100
    ckpt = torch.load(out, weights_only=True)
    ckpt["config"]["train"]["dataset"] = "cifar100"
    torch.save(ckpt, mismatched)
    r = run("eval.py", truncated, "--data", root)  # the real CLI; in our words, not torch's about zip internals
    assert_user_error(r, "truncated.pt", "cannot be read: the file is truncated", ".best.pt")
    assert "miniz" not in r.stderr and "PytorchStreamReader" not in r.stderr
    for path, word in ((tmp_path / "missing.pt", "does not exist"), (text, "cannot be read"),
                       (foreign, "not a checkpoint"), (odd, "not a checkpoint"), (untyped, "not a checkpoint"),
                       (other_arch, "does not fit"), (mismatched, "10-class model")):
        r = run_here(eval_cli, path, "--data", root, "--n", "5", "--device", "cpu", capsys=capsys)
        assert_user_error(r, path.name, word)
    for flags, word in ((["--eps", "-1"], "--eps"), (["--n", "0"], "--n"), (["--batch-size", "0"], "--batch-size"),
                        (["--attacks", "clean,bogus"], "bogus"), (["--alpha", "0"], "--alpha"),
                        (["--json", tmp_path / "no" / "x.json"], "--json"), (["--json", out], "--json"),
                        (["--json", tmp_path], "folder"), (["--json", ""], "--json"), (["--seed", "-1"], "--seed")):
        assert_user_error(run_here(eval_cli, out, "--data", root, *flags, capsys=capsys), word)


@pytest.mark.parametrize("loss", train.LOSSES)
def test_train_step_every_loss(loss):
    """One step of each loss updates the model with a finite loss; a fine-tuning step moves the classifier only
    (backbone weights and BatchNorm statistics frozen)."""
    torch.manual_seed(0)
    args = train.get_args(["--loss", loss, *TINY])
    model = train.build_model({"width": 4})
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    total, parts, logits_adv, logits_clean = step.train_step(model, model, opt, x, y, args)
    assert torch.isfinite(total) and (parts[1].item() > 0 if loss != "ce" else parts[1].item() == 0)
    assert (logits_clean is None) == (loss == "ce") and logits_adv.shape == (16, 10)
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    step.train_step(model, model, torch.optim.SGD(model.classifier.parameters(), lr=0.1), x, y, args, finetune=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("loss", train.LOSSES)
def test_bf16_training_step_on_the_cpu(loss, monkeypatch):
    """--amp on the CPU: a bf16 autocast step of each loss runs the network in bf16 and returns a finite float32
    loss and parts; the contrastive term equals anchor_loss of the same features in float32 outside autocast (its
    core runs in float32)."""
    torch.manual_seed(0)
    args = train.get_args(["--loss", loss, "--amp", *TINY])
    model = train.build_model({"width": 4})
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 3, (16,))
    calls, real = [], step.anchor_loss
    monkeypatch.setattr(step, "anchor_loss", lambda f, *a, **k: calls.append((f, a, real(f, *a, **k))) or calls[-1][2])
    dtypes = set()
    model.classifier.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    total, parts, _, _ = step.train_step(model, model, step.make_optimizer(model, args, False), x, y, args)
    assert dtypes == {torch.bfloat16}  # the network ran under autocast, the attack and the update
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in (total, *parts))
    assert len(calls) == (loss in ("anchor", "supcon"))
    for features, a, value in calls:
        assert features.dtype == torch.bfloat16 and torch.equal(value, real(features.detach().float(), *a))


def test_bench_runs_the_training_step(tmp_path):
    """bench.py measures train.py's own step (a smoke test; speed itself is never asserted)."""
    import bench
    j = tmp_path / "bench.json"
    bench.main(bench.get_args(["--device", "cpu", "--width", "4", "--batch-size", "8", "--steps", "1",
                               "--warmup", "0", "--iters", "1", "--json", str(j)]))
    table = json.loads(j.read_text())
    # the CPU's variants at width 4: no channels-last (oneDNN's AVX2 kernels crash at widths 2-7)
    assert [(r["loss"], r["precision"]) for r in table["rows"]] == [(loss, v) for v in ("fp32", "bf16")
                                                                     for loss in ("ce", "anchor")]
    assert all(r["images_per_s"] > 0 for r in table["rows"])
    for flags, word in ((["--arch", "wrn-16-2", "--width", "8"], "--width"), (["--json", tmp_path / "no" / "b.json"], "no")):
        with pytest.raises(CLIError, match=word):  # refused before any step, not ignored or lost after the run
            bench.get_args(["--device", "cpu", *map(str, flags)])


def test_lr_schedule():
    total, peak = 40, 0.2
    lrs = [step.lr_at(s, total, peak) for s in range(total)]
    warm = lrs.index(max(lrs))
    assert lrs[warm] == pytest.approx(peak) and warm == int(0.15 * total) - 1
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # rising
    assert all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then falling
    assert 0 < lrs[-1] < 0.01 * peak  # near 0, but the last step still updates
    assert [step.lr_at(s, 2, peak) for s in range(2)] == [peak, pytest.approx(peak / 2)]


def test_eval_sanity_checks_fire():
    """Each warning fires on a model built to trip it, and none on a plain one."""
    torch.manual_seed(0)
    model = train.build_model({"width": 4}).eval()
    x, y = torch.rand(40, 3, 16, 16), torch.randint(0, 10, (40,))  # the model pools adaptively: any size
    opts = eval_cli.Settings(eps=8 / 255, alpha=2 / 255, batch_size=20, seed=0, progress=False)
    assert eval_cli.sanity_checks(model, x, y, {"fgsm": 0.5, "pgd20": 0.5}, opts) == []
    cases = {
        "differ": torch.nn.Sequential(model, torch.nn.Dropout(0.5).train()),
        "probabilities": torch.nn.Sequential(model, torch.nn.Softmax(dim=1)),
        "zero input gradient": lambda inputs: model(torch.round(inputs * 4) / 4),  # a step function
    }
    for word, wrapped in cases.items():
        assert any(word in w for w in eval_cli.sanity_checks(wrapped, x, y, {}, opts)), word
    warnings = eval_cli.sanity_checks(model, x, y, {"fgsm": 0.30, "pgd20": 0.45, "cw_inf": 0.9}, opts)
    assert len(warnings) == 1 and "pgd20" in warnings[0]  # cw_inf is not nested with the CE attacks


def test_autoattack_cascade_attacks_only_the_still_robust(monkeypatch, capsys):
    """Each stage runs only on the images every earlier stage left robust, and an image counted robust at the
    end was attacked by every stage and survived each. Fake attacks that break fixed images make this exact."""
    model = torch.nn.Linear(1, 2, bias=False)
    model.weight.data = torch.tensor([[1.0], [-1.0]])  # class 0 iff the first pixel > 0

    def features(x):  # the model sees the first pixel of the image
        return model(x.flatten(1)[:, :1] - 0.5)

    breaks = {"apgd_ce": {1, 2}, "apgd_t": {3, 4}, "square": {5}}  # image indices each stage can break
    seen = {}

    def fake(name):
        def attack(m, x, y, eps, alpha, seed):  # image k carries k in its second pixel
            ids = (x.flatten(1)[:, 1] * 255).round().long().tolist()
            seen.setdefault(name, []).extend(ids)
            x = x.clone()
            x.view(len(x), -1)[[i for i, k in enumerate(ids) if k in breaks[name]], 0] = 0  # fooled
            return x
        return attack

    for name in breaks:
        monkeypatch.setitem(eval_cli.ATTACKS, name, (fake(name), 1))
    x = torch.ones(8, 1, 1, 2)
    x[:, 0, 0, 1] = torch.arange(8) / 255
    x[0, 0, 0, 0] = 0  # image 0 is misclassified already
    y = torch.zeros(8, dtype=torch.long)
    opts = eval_cli.Settings(eps=0, alpha=0, batch_size=3, seed=0, progress=True)
    clean = eval_cli.run_attack(features, x, y, "clean", opts)
    after = eval_cli.autoattack(features, x, y, clean, opts)
    assert sorted(seen["apgd_ce"]) == [1, 2, 3, 4, 5, 6, 7]  # not image 0
    assert sorted(seen["apgd_t"]) == [3, 4, 5, 6, 7]
    assert sorted(seen["square"]) == [5, 6, 7]
    robust = after["square"].nonzero().squeeze(1).tolist()
    assert robust == [6, 7] and all(set(robust) <= set(seen[name]) for name in breaks)
    assert after["apgd_ce"].sum() == 5 and after["apgd_t"].sum() == 3  # robust after each stage, printed
    out = capsys.readouterr().out
    assert "apgd_t" in out and "0.3750" in out and "0.2500" in out
    # a clean mistake is never attacked, so it cannot be counted robust where an attack lands on the right class
    monkeypatch.setitem(eval_cli.ATTACKS, "pgd20", (lambda m, x, y, eps, alpha, seed: torch.ones_like(x), 1))
    assert eval_cli.attack_robust(features, x, y, clean, "pgd20", opts).tolist() == [False] + [True] * 7


def test_progress_line_in_a_piped_run(trained_model, monkeypatch, capsys):
    """On a pipe (not a terminal) the progress line is plain lines: images done of total, robust so far, ETA.
    Inside a batch it moves with the attack's model calls, and the robust count is an upper bound: exact for the
    batches done, plus the images the attack still queries."""
    model, x, y = trained_model
    monkeypatch.setattr(eval_cli.Progress, "PIPE_SECONDS", 0)
    opts = eval_cli.Settings(eps=4 / 255, alpha=1 / 255, batch_size=32, seed=0, progress=True)

    def lines(label):
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith(label + " [")]

    correct = eval_cli.run_attack(model, x, y, "pgd20", opts, label="pgd20")
    out = lines("pgd20")
    assert len(out) > 20 and all("ETA" in line for line in out)  # 21 calls a batch
    done = [int(line.split("] ")[1].split("/")[0]) for line in out]
    assert done == sorted(done) and 0 < done[-1] <= len(x)  # images done only grow, inside a batch too
    first = int(correct[:32].sum())  # PGD queries the whole batch: the bound is the first batch's count + 32
    assert any(f"robust <= {first + 32}/64 " in line for line in out) and f"robust <= 32/32 " in out[0]

    monkeypatch.setitem(eval_cli.ATTACKS, "square", (lambda m, x, y, eps, alpha, seed: square(m, x, y, eps, 60), 61))
    correct = eval_cli.run_attack(model, x, y, "square", opts._replace(eps=8 / 255, batch_size=64), label="square")
    bounds = [int(line.split("robust <= ")[1].split("/")[0]) for line in lines("square")]
    assert bounds[0] == 64 and bounds == sorted(bounds, reverse=True)  # falls as Square fools images
    assert bounds[-1] < 64 and bounds[-1] >= int(correct.sum())  # an upper bound of what stays robust


def test_square_masking_warning():
    torch.manual_seed(0)
    model = train.build_model({"width": 4}).eval()
    x, y = torch.rand(40, 3, 16, 16), torch.randint(0, 10, (40,))
    opts = eval_cli.Settings(eps=8 / 255, alpha=2 / 255, batch_size=20, seed=0, progress=False)
    assert eval_cli.sanity_checks(model, x, y, {}, opts, square_only=2) == []  # a couple of images: noise
    warnings = eval_cli.sanity_checks(model, x, y, {}, opts, square_only=3)
    assert len(warnings) == 1 and "Square" in warnings[0] and "3 images" in warnings[0]


def test_cifar100_preact_end_to_end(tmp_path, capsys):
    """--dataset cifar100 --arch preact-resnet18: both saved in the checkpoint, eval reads them from it and runs
    the targeted and black-box attacks over 100 classes."""
    make_cifar(tmp_path, dataset="cifar100")
    out = tmp_path / "c100.pt"
    r = run_here(train, "--data", tmp_path, "--dataset", "cifar100", "--arch", "preact-resnet18", "--epochs", 1,
                 "--out", out, *TINY, capsys=capsys)
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["train"]["dataset"] == "cifar100" and ckpt["config"]["model"]["arch"] == "preact-resnet18"
    assert ckpt["config"]["model"]["num_classes"] == 100 and ckpt["config"]["model"]["mean"][0] == pytest.approx(0.5071)
    j = tmp_path / "c100.json"
    r = run_here(eval_cli, out, "--data", tmp_path, "--n", 10, "--attacks", "clean,apgd_t,square,autoattack",
                 "--device", "cpu", "--json", j, capsys=capsys)
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text())
    assert result["dataset"] == "cifar100" and set(result["accuracy"]) == {"clean", "apgd_t", "square", "autoattack", "worst"}
    assert "preact-resnet18" in r.stdout and "cifar100" in r.stdout


def test_wrong_data_set_and_unknown_arch(trained, tmp_path, capsys):
    root, out, _ = trained  # root holds CIFAR-10 only
    r = run_here(train, "--data", root, "--dataset", "cifar100", "--out", tmp_path / "x.pt", *TINY, capsys=capsys)
    assert_user_error(r, "CIFAR-10", "--dataset cifar10")
    assert not (tmp_path / "x.pt").exists()
    ckpt = torch.load(out, weights_only=True)
    ckpt["config"]["model"]["arch"] = "vit-tiny"
    torch.save(ckpt, tmp_path / "vit.pt")
    assert_user_error(run_here(eval_cli, tmp_path / "vit.pt", "--data", root, capsys=capsys), "vit-tiny", "use the code")
    # --resume reads the same check
    assert_user_error(run_here(train, "--resume", "--out", tmp_path / "vit.pt", "--data", root, capsys=capsys), "vit-tiny")
    for flags, word in ((["--arch", "wrn-35-10"], "--arch"), (["--arch", "vgg16"], "--arch"),
                        (["--arch", "wrn-28-10", "--width", "16"], "--width"), (["--dataset", "mnist"], "--dataset")):
        r = run_here(train, "--data", root, "--out", tmp_path / "y.pt", *TINY, *flags, capsys=capsys)
        assert_user_error(r, word)


# ---------------------------------------------------------------- robustness(): any model, from Python

SMALL_EPS = 4 / 255  # the small net below keeps some images robust here and loses others


@pytest.fixture(scope="module")
def small_net():
    """(a plain nn.Sequential with no `features` or `head`, in eval mode; x [48, 3, 16, 16]; y [48] in 0..4):
    trained for a moment on synthetic 16x16 images of 5 classes (about 65% clean accuracy)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = synthetic_images(560, generator, amplitude=0.1, classes=5)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().zero_grad(set_to_none=True)
    return net, x[512:], y[512:]


SQUARE_QUERIES = 200  # for time: Square's 5,000 cost ~8 s here, and Square itself is tested in test_attacks.py


def by_hand(model, x, y, eps, alpha, seed):
    """Per-image robustness under the default attacks, straight from attacks.py, each on the clean-correct images
    and AutoAttack's stages each on what the previous one left robust (one batch: no batching to mirror)."""
    def survives(attack, robust):
        idx = robust.nonzero()[:, 0]
        torch.manual_seed(seed)
        robust = robust.clone()
        with torch.no_grad():
            robust[idx] = model(attack(x[idx], y[idx])).argmax(1) == y[idx]
        return robust

    with torch.no_grad():
        clean = model(x).argmax(1) == y
    out = {"clean": clean,
           "fgsm": survives(lambda a, b: fgsm(model, a, b, eps), clean),
           "pgd20": survives(lambda a, b: pgd(model, a, b, eps, alpha, 20), clean),
           "cw_inf": survives(lambda a, b: pgd(model, a, b, eps, alpha, 30, loss="cw"), clean)}
    stages = {"apgd_ce": lambda a, b: apgd(model, a, b, eps, 100, seed=seed),
              "apgd_t": lambda a, b: apgd(model, a, b, eps, 100, loss="dlr", targeted=True, seed=seed),
              "square": lambda a, b: square(model, a, b, eps, SQUARE_QUERIES, seed=seed)}
    robust = clean
    for name, attack in stages.items():
        robust = out[name] = survives(attack, robust)
    out["autoattack"] = out.pop("square")
    out["worst"] = torch.stack([out[k] for k in ("clean", "fgsm", "pgd20", "cw_inf", "autoattack")]).all(0)
    return out


def test_robustness_of_any_model_equals_the_attacks(small_net, monkeypatch, capsys):
    """A model this project did not build (other input size, 5 classes, no features): the same numbers as the
    attack functions called one by one, per class too; silent with progress=False."""
    net, x, y = small_net
    monkeypatch.setitem(eval_cli.ATTACKS, "square", (lambda m, x, y, eps, alpha, seed:
                                                     square(m, x, y, eps, SQUARE_QUERIES, seed=seed), SQUARE_QUERIES))
    result = eval_cli.robustness(net, x, y, eps=SMALL_EPS, alpha=1 / 255, batch_size=64, seed=3, progress=False)
    assert capsys.readouterr().out == ""
    expected = by_hand(net, x, y, SMALL_EPS, 1 / 255, seed=3)
    names = ["clean", "fgsm", "pgd20", "cw_inf", "autoattack", "worst"]
    assert list(result["accuracy"]) == list(result["per_class"]) == names
    for name in names:
        assert result["accuracy"][name] == expected[name].float().mean().item(), name
        assert result["per_class"][name] == pytest.approx([expected[name][y == k].float().mean().item()
                                                           for k in range(5)]), name
    assert result["autoattack_stages"] == {k: expected[k].float().mean().item() for k in ("apgd_ce", "apgd_t")} | \
        {"square": result["accuracy"]["autoattack"]}
    assert 0 < result["accuracy"]["worst"] < result["accuracy"]["clean"] < 1  # a mix: the comparison means something
    assert (result["n"], result["eps"], result["seed"], result["warnings"]) == (48, SMALL_EPS, 3, [])
    assert "representation" not in result  # no features() to look into
    report = eval_cli.robustness(net, x, y, attacks="clean", progress=False, features=net[:4])["representation"]
    assert -1 <= report["inter_class_cos"] <= report["intra_class_cos"] <= 1


def test_robustness_leaves_mode_gradients_and_rng(small_net):
    """The evaluation runs in eval mode and leaves each module's mode, the parameters' .grad (None or not) and
    the global random state as it found them."""
    net = copy.deepcopy(small_net[0]).train()
    x, y = small_net[1:]
    net[1].eval()  # one module in eval mode, the rest in train mode: each keeps its own
    net[0].weight.grad = torch.ones_like(net[0].weight)
    seen, bn_before = [], net[1].running_mean.clone()
    net.register_forward_hook(lambda m, *_: seen.append(any(k.training for k in m.modules())))
    rng = torch.get_rng_state()
    eval_cli.robustness(net, x, y, attacks="clean,fgsm,pgd20", progress=False)
    assert seen and not any(seen)  # every call in eval mode
    assert [m.training for m in net.modules()] == [True, True, False, True, True, True, True]
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "0.weight")
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(net[1].running_mean, bn_before)


def test_robustness_bad_input(small_net):
    """Out-of-range labels, images outside [0, 1], uint8 images, a model returning a tuple, an unknown attack:
    a ValueError naming the fix, the model's mode untouched; a model returning probabilities: the warning."""
    net, x, y = small_net
    net.train()
    try:
        for args, words in (((x, y + 5), "labels must be class indices 0..4"), ((x * 255, y), r"must lie in \[0, 1\]"),
                            (((x * 255).to(torch.uint8), y), r"x.float\(\) / 255"),
                            ((x, y.int()), "y must be int64")):
            with pytest.raises(ValueError, match=words):
                eval_cli.robustness(net, *args, progress=False)
            assert net.training and net[1].training
    finally:
        net.eval()
    with pytest.raises(ValueError, match="return the logits alone"):
        eval_cli.robustness(lambda images: (net(images), images), x, y, progress=False)
    with pytest.raises(ValueError, match="unknown attack pgd7"):
        eval_cli.robustness(net, x, y, attacks=["clean", "pgd7"], progress=False)
    probabilities = torch.nn.Sequential(net, torch.nn.Softmax(dim=1))
    warnings = eval_cli.robustness(probabilities, x, y, attacks="clean", progress=False)["warnings"]
    assert any("probabilities, not logits" in w for w in warnings)
