"""End-to-end tests of train.py and eval.py as users run them (subprocesses on a tiny data set in the official
format), resume equivalence, and the bad-input cases: one line on stderr, exit status 2, nothing lost."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as eval_cli
import train
from attacks import square
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


def test_eval_json(trained, tmp_path):
    root, out, _ = trained
    j = tmp_path / "eval.json"
    r = run("eval.py", out, "--data", root, "--n", 20, "--device", "cpu", "--json", j, "--eps-sweep")
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text(), parse_constant=strict)
    acc = result["accuracy"]
    assert result["n"] == 20 and result["eps"] == pytest.approx(8 / 255) and result["loss"] == "anchor"
    assert set(acc) == {"clean", "fgsm", "pgd20", "cw_inf", "autoattack", "worst"}
    assert all(0 <= a <= 1 for a in acc.values())
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


def test_eval_subset_and_cw_l2(trained, tmp_path, capsys):
    root, out, _ = trained
    j = tmp_path / "sub.json"
    r = run_here(eval_cli, out, "--data", root, "--n", 10, "--attacks", "clean,apgd-ce,cw_l2", "--json", j,
                 "--device", "cpu", capsys=capsys)
    assert r.returncode == 0, r.stderr
    result = json.loads(j.read_text())
    assert set(result["accuracy"]) == {"clean", "apgd_ce", "worst"}
    cw = result["cw_l2"]
    assert cw["attacked"] == round(result["accuracy"]["clean"] * 10)
    assert 0 <= cw["success_rate"] <= 1 if cw["attacked"] else cw["success_rate"] is None


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Ctrl-C mid-epoch, then --resume: the same weights as a run never stopped (CPU, fixed seed)."""
    make_cifar(tmp_path)
    common = ["--data", str(tmp_path), "--epochs", "2", "--finetune-epochs", "1", "--loss", "anchor", *TINY]
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
    monkeypatch.setattr(train, "batches", real_batches)
    assert train.main(train.get_args(["--resume", "--out", str(tmp_path / "b.pt"), "--data", str(tmp_path)])) == 0

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
    r = run_here(train, "--data", root, "--out", root / "run", *TINY, capsys=capsys)
    assert_user_error(r, "--out", "folder")


@pytest.mark.parametrize("flags,words", [
    (["--eps", "-0.1"], ["--eps"]), (["--eps", "abc"], ["--eps"]), (["--steps", "0"], ["--steps"]),
    (["--batch-size", "0"], ["--batch-size"]), (["--loss", "bogus"], ["--loss"]), (["--val", "-1"], ["--val"]),
    (["--limit", "100000"], ["--limit"]), (["--batch-size", "4096"], ["--batch-size"]),
    (["--beta", "-1"], ["--beta"]), (["--device", "tpu"], ["--device"]), (["--alpha", "0"], ["--alpha"]),
    (["--wd", "-1"], ["--wd"]), (["--beta", "nan"], ["--beta"]), (["--lam", "nan"], ["--lam"]),
    (["--lr", "inf"], ["--lr"]), (["--epochs", "0"], ["--epochs"]),
])
def test_train_bad_flags(trained, tmp_path, capsys, flags, words):
    root, _, _ = trained
    r = run_here(train, "--data", root, "--out", tmp_path / "x.pt", *TINY, *flags, capsys=capsys)
    assert_user_error(r, *words)
    assert not (tmp_path / "x.pt").exists()


def test_missing_data_without_network(tmp_path, capsys):
    r = run("train.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "x.pt", *TINY)
    assert_user_error(r, "by hand", "--data")
    assert not (tmp_path / "x.pt").exists()


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
    assert_user_error(run("eval.py", truncated, "--data", root), "truncated.pt", "cannot be read")  # the real CLI
    for path, word in ((tmp_path / "missing.pt", "does not exist"), (text, "cannot be read"),
                       (foreign, "not a checkpoint"), (odd, "not a checkpoint"), (untyped, "not a checkpoint"),
                       (other_arch, "does not fit"), (mismatched, "10-class model")):
        r = run_here(eval_cli, path, "--data", root, "--n", "5", "--device", "cpu", capsys=capsys)
        assert_user_error(r, path.name, word)
    for flags, word in ((["--eps", "-1"], "--eps"), (["--n", "0"], "--n"), (["--batch-size", "0"], "--batch-size"),
                        (["--attacks", "clean,bogus"], "bogus"), (["--alpha", "0"], "--alpha"),
                        (["--json", tmp_path / "no" / "x.json"], "--json"), (["--json", out], "--json")):
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
    total, parts, logits_adv, logits_clean = train.train_step(model, model, opt, x, y, args)
    assert torch.isfinite(total) and (parts[1].item() > 0 if loss != "ce" else parts[1].item() == 0)
    assert (logits_clean is None) == (loss == "ce") and logits_adv.shape == (16, 10)
    assert not torch.equal(before["conv1.weight"], model.conv1.weight)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    train.train_step(model, model, torch.optim.SGD(model.classifier.parameters(), lr=0.1), x, y, args, finetune=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_bench_runs_the_training_step(tmp_path):
    """bench.py measures train.py's own step (a smoke test; speed itself is never asserted)."""
    import bench
    j = tmp_path / "bench.json"
    bench.main(bench.get_args(["--device", "cpu", "--width", "4", "--batch-size", "8", "--steps", "1",
                               "--warmup", "0", "--iters", "1", "--json", str(j)]))
    table = json.loads(j.read_text())
    assert [(r["loss"], r["precision"]) for r in table["rows"]] == [  # the CPU's variants: NCHW, then the default
        ("ce", "fp32"), ("anchor", "fp32"), ("ce", "channels_last"), ("anchor", "channels_last")]
    assert all(r["images_per_s"] > 0 for r in table["rows"])


def test_lr_schedule():
    total, peak = 40, 0.2
    lrs = [train.lr_at(s, total, peak) for s in range(total)]
    warm = lrs.index(max(lrs))
    assert lrs[warm] == pytest.approx(peak) and warm == int(0.15 * total) - 1
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))  # rising
    assert all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # then falling
    assert lrs[-1] == pytest.approx(0, abs=1e-12) and min(lrs[:-1]) > 0
    assert [train.lr_at(s, 2, peak) for s in range(2)] == [peak, pytest.approx(0, abs=1e-12)]


def test_eval_sanity_checks_fire():
    """Each warning fires on a model built to trip it, and none on a plain one."""
    torch.manual_seed(0)
    model = train.build_model({"width": 4}).eval()
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    args = eval_cli.get_args(["unused.pt", "--device", "cpu", "--batch-size", "20"])
    assert eval_cli.sanity_checks(model, x, y, {"fgsm": 0.5, "pgd20": 0.5}, args) == []
    cases = {
        "differ": torch.nn.Sequential(model, torch.nn.Dropout(0.5).train()),
        "probabilities": torch.nn.Sequential(model, torch.nn.Softmax(dim=1)),
        "zero input gradient": lambda inputs: model(torch.round(inputs * 4) / 4),  # a step function
    }
    for word, wrapped in cases.items():
        assert any(word in w for w in eval_cli.sanity_checks(wrapped, x, y, {}, args)), word
    warnings = eval_cli.sanity_checks(model, x, y, {"fgsm": 0.30, "pgd20": 0.45, "cw_inf": 0.9}, args)
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
    x = torch.full((8, 1, 1, 2), 255, dtype=torch.uint8)
    x[:, 0, 0, 1] = torch.arange(8)
    x[0, 0, 0, 0] = 0  # image 0 is misclassified already
    y = torch.zeros(8, dtype=torch.long)
    args = eval_cli.get_args(["unused.pt", "--device", "cpu", "--batch-size", "3"])
    clean = eval_cli.run_attack(features, x, y, "clean", 0, 0, args)
    after = eval_cli.autoattack(features, x, y, clean, args)
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
    assert eval_cli.attack_robust(features, x, y, clean, "pgd20", 0, 0, args).tolist() == [False] + [True] * 7


def test_progress_line_in_a_piped_run(trained_model, monkeypatch, capsys):
    """On a pipe (not a terminal) the progress line is plain lines: images done of total, robust so far, ETA.
    Inside a batch it moves with the attack's model calls, and the robust count is an upper bound: exact for the
    batches done, plus the images the attack still queries."""
    model, x, y = trained_model
    monkeypatch.setattr(eval_cli.Progress, "PIPE_SECONDS", 0)
    args = eval_cli.get_args(["unused.pt", "--device", "cpu", "--batch-size", "32"])
    x8 = (x * 255).round().to(torch.uint8)

    def lines(label):
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith(label + " [")]

    correct = eval_cli.run_attack(model, x8, y, "pgd20", 4 / 255, 1 / 255, args, label="pgd20")
    out = lines("pgd20")
    assert len(out) > 20 and all("ETA" in line for line in out)  # 21 calls a batch
    done = [int(line.split("] ")[1].split("/")[0]) for line in out]
    assert done == sorted(done) and 0 < done[-1] <= len(x)  # images done only grow, inside a batch too
    first = int(correct[:32].sum())  # PGD queries the whole batch: the bound is the first batch's count + 32
    assert any(f"robust <= {first + 32}/64 " in line for line in out) and f"robust <= 32/32 " in out[0]

    monkeypatch.setitem(eval_cli.ATTACKS, "square", (lambda m, x, y, eps, alpha, seed: square(m, x, y, eps, 60), 61))
    args.batch_size = 64
    correct = eval_cli.run_attack(model, x8, y, "square", 8 / 255, 0, args, label="square")
    bounds = [int(line.split("robust <= ")[1].split("/")[0]) for line in lines("square")]
    assert bounds[0] == 64 and bounds == sorted(bounds, reverse=True)  # falls as Square fools images
    assert bounds[-1] < 64 and bounds[-1] >= int(correct.sum())  # an upper bound of what stays robust


def test_square_masking_warning():
    torch.manual_seed(0)
    model = train.build_model({"width": 4}).eval()
    x, y = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,))
    args = eval_cli.get_args(["unused.pt", "--device", "cpu", "--batch-size", "20"])
    assert eval_cli.sanity_checks(model, x, y, {}, args, square_only=2) == []  # a couple of images: noise
    warnings = eval_cli.sanity_checks(model, x, y, {}, args, square_only=3)
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


def test_wrong_data_set_and_unknown_arch(tmp_path, capsys):
    make_cifar(tmp_path)  # CIFAR-10 only
    r = run_here(train, "--data", tmp_path, "--dataset", "cifar100", "--out", tmp_path / "x.pt", *TINY, capsys=capsys)
    assert_user_error(r, "CIFAR-10", "--dataset cifar10")
    assert not (tmp_path / "x.pt").exists()
    r = run_here(train, "--data", tmp_path, "--epochs", 1, "--out", tmp_path / "ok.pt", *TINY, capsys=capsys)
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    ckpt["config"]["model"]["arch"] = "vit-tiny"
    torch.save(ckpt, tmp_path / "vit.pt")
    assert_user_error(run_here(eval_cli, tmp_path / "vit.pt", "--data", tmp_path, capsys=capsys), "vit-tiny", "use the code")
    torch.save(ckpt, tmp_path / "ok.pt")  # --resume reads the same check
    assert_user_error(run_here(train, "--resume", "--out", tmp_path / "ok.pt", "--data", tmp_path, capsys=capsys), "vit-tiny")
    for flags, word in ((["--arch", "wrn-35-10"], "--arch"), (["--arch", "vgg16"], "--arch"),
                        (["--arch", "wrn-28-10", "--width", "16"], "--width"), (["--dataset", "mnist"], "--dataset")):
        r = run_here(train, "--data", tmp_path, "--out", tmp_path / "y.pt", *TINY, *flags, capsys=capsys)
        assert_user_error(r, word)
