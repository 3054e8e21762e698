"""train.py's pieces against hand-written versions: the BatchNorm-matched control (--loss anchor --lam 0), the
validation count, TRADES's attack, the defaults that depend on the loss and the device."""
import copy

import pytest
import torch
import torch.nn.functional as F

import step
import train
from attacks import pgd
from test_cli import TINY


def one_step(model, args, x, y, seed=0):
    """train.py's step with its own optimizer; -> (parts, adversarial logits, the RNG state after)."""
    torch.manual_seed(seed)
    opt = step.make_optimizer(model, args, finetune=False)
    _, parts, logits_adv, _ = step.train_step(model, model, opt, x, y, args)
    return parts, logits_adv, torch.get_rng_state()


def test_lam_0_is_ce_on_the_joint_pass_with_the_same_random_stream():
    """--loss anchor --lam 0: the same forward pass (both views through BatchNorm) and the same random stream as
    --lam 1, no contrastive gradient (the head is not trained), and an update equal to CE alone on that pass."""
    torch.manual_seed(0)
    model = train.build_model({"width": 4})
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 3, (16,))
    control, full, by_hand = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    lam0, lam1 = train.get_args(["--lam", "0", *TINY]), train.get_args(["--lam", "1", *TINY])
    parts0, adv0, rng0 = one_step(control, lam0, x, y)
    parts1, adv1, rng1 = one_step(full, lam1, x, y)
    assert torch.equal(rng0, rng1) and torch.equal(adv0, adv1)  # the same PGD starts, the same forward
    assert parts0[1].item() == parts1[1].item() > 0  # the contrastive term is measured (logged) in both
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    assert all(torch.equal(control.state_dict()[k], v) for k, v in head.items())  # lam 0: the head is not trained
    assert not all(torch.equal(full.state_dict()[k], v) for k, v in head.items())

    torch.manual_seed(0)  # the control by hand: PGD in eval mode, then CE on the adversarial half of one pass
    by_hand.eval()
    x_adv = pgd(by_hand, x, y, lam0.eps, lam0.alpha, lam0.steps)
    by_hand.train()
    opt = torch.optim.SGD([p for n, p in by_hand.named_parameters() if not n.startswith("head.")], lr=lam0.lr,
                          momentum=0.9, nesterov=True, weight_decay=lam0.wd)
    logits = by_hand(torch.cat([x, x_adv]))
    F.cross_entropy(logits[len(x):], y).backward()
    opt.step()
    for k, v in by_hand.state_dict().items():  # weights and BatchNorm statistics of the joint pass
        assert torch.allclose(control.state_dict()[k].float(), v.float(), atol=1e-6), k
    assert not torch.allclose(full.conv1.weight, control.conv1.weight)  # lam 1's contrastive gradient moves it


class WrongUntilPerturbed(torch.nn.Module):
    """Class 0 for images on the 1/255 grid (clean images), class 1 for any other: a random start lands on the
    right class (1) of an image it misclassifies clean. Zero input gradient, so PGD stays at its start."""

    def forward(self, x):
        off_grid = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3).float()  # (N,)
        return torch.stack([1 - off_grid, off_grid], 1) * 10 + 0 * x.flatten(1).sum(1, keepdim=True)  # (N, 2)


def test_validation_counts_robust_only_where_clean_is_right():
    args = train.get_args(TINY)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.ones(40, dtype=torch.int64)
    clean, robust = train.evaluate(WrongUntilPerturbed(), x, y, args, batch_size=16).tolist()
    assert clean == 0 and robust == 0  # counted as robust before: the perturbed images were "right"
    y[:10] = 0  # right when clean, fooled by any start
    assert train.evaluate(WrongUntilPerturbed(), x, y, args, batch_size=16).tolist() == [10, 0]


def test_trades_attacks_as_its_reference_code():
    """--loss trades: step 0.007 unless --alpha says otherwise, and a start at x + 0.001 N(0, 1)."""
    assert train.get_args(["--loss", "trades", *TINY]).alpha == 0.007
    assert train.get_args(["--loss", "trades", "--alpha", "0.003", *TINY]).alpha == 0.003
    assert train.get_args(TINY).alpha == 2 / 255 and train.get_args(TINY).lam == 1.0
    x, y = torch.rand(4, 3, 8, 8) * 0.5 + 0.25, torch.zeros(4, dtype=torch.int64)
    flat = lambda inputs: 0 * inputs.flatten(1)[:, :2]  # zero gradient: PGD stays where it starts
    torch.manual_seed(0)
    start = pgd(flat, x, y, 8 / 255, 0.007, 1, random_start=0.001)
    torch.manual_seed(0)
    assert torch.equal(start, x + 0.001 * torch.randn_like(x))
    torch.manual_seed(0)
    uniform = pgd(flat, x, y, 8 / 255, 0.007, 1)
    assert (uniform - x).abs().max() > 0.02  # the uniform start spreads over the eps-ball (8/255 = 0.031)


def test_layout_default_follows_the_device_and_width():
    """NHWC on CUDA; on the CPU NHWC from 16 channels (faster there), NCHW below (faster at width 8; oneDNN's
    AVX2 NHWC kernels crash at widths 2-7)."""
    assert train.get_args(TINY).channels_last is False
    assert train.get_args([*TINY, "--width", "8"]).channels_last is False
    assert train.get_args([*TINY, "--width", "16"]).channels_last is True
    assert train.get_args([*TINY[2:], "--arch", "wrn-16-1"]).channels_last is True
    assert train.get_args([*TINY, "--channels-last"]).channels_last is True
    assert train.get_args([*TINY, "--width", "16", "--no-channels-last"]).channels_last is False


@pytest.mark.parametrize("width", [8, 16])
def test_default_layout_trains(width):
    """A training step in the CPU's default layout for the width (NCHW at 8, channels-last at 16) moves the weights
    with a finite loss; .ci/run runs it again on oneDNN's AVX2 kernels, where channels-last crashed at widths 2-7."""
    torch.manual_seed(0)
    args = train.get_args([*TINY, "--width", str(width), "--loss", "anchor"])
    model, net = train.make_model(args, torch.device("cpu"))
    assert args.channels_last == (width >= 16) and model.conv1.weight.is_contiguous(
        memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    before = model.conv1.weight.clone()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 3, (16,))
    total, *_ = step.train_step(model, net, step.make_optimizer(model, args, False), x, y, args)
    assert torch.isfinite(total) and not torch.equal(before, model.conv1.weight)


def test_second_view_attacks_another_augmentation_of_the_same_images():
    """--adv-view second: the adversarial view is made from a second augmentation, drawn from a stream of its own,
    so the first view and the data order are those of --adv-view same."""
    import data
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(64) % 10
    same = list(data.batches(x, y, 16, shuffle_seed=5, augment=True))
    second = list(data.batches(x, y, 16, shuffle_seed=5, augment=True, second_view=True))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(same, second))
    assert not torch.equal(second[0][0], second[0][2])  # another crop or flip of the same images

    torch.manual_seed(0)
    model = train.build_model({"width": 4})
    args = train.get_args(["--adv-view", "second", *TINY])
    xb, yb, xb2 = second[0]
    seen = []
    real_pgd = step.pgd
    try:
        step.pgd = lambda net, source, *a, **k: seen.append(source) or real_pgd(net, source, *a, **k)
        step.train_step(model, model, step.make_optimizer(model, args, False), xb, yb, args, x_second=xb2)
    finally:
        step.pgd = real_pgd
    assert torch.equal(seen[0], xb2)  # the attack starts from the second view


def test_validation_runs_without_tf32(monkeypatch):
    """On Ampere and later GPUs cuDNN uses TF32 by default; validation turns it off, and gives the flags back."""
    seen = []
    monkeypatch.setattr(train, "pgd", lambda model, x, *a, **k: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)) or x)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x, y = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.ones(6, dtype=torch.int64)
        train.evaluate(WrongUntilPerturbed(), x, y, train.get_args(TINY), batch_size=4)
        assert seen == [(False, False)] * 2  # two batches, both in float32
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_pgd_start_argument_is_checked():
    x, y = torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64)
    flat = lambda inputs: 0 * inputs.flatten(1)[:, :2]
    for bad in (1, float("nan"), -0.1, "yes"):
        with pytest.raises(ValueError, match="random_start"):
            pgd(flat, x, y, 8 / 255, 0.007, 1, random_start=bad)


def test_validation_attack_is_one_ruler_for_every_training_attack(monkeypatch):
    """Validation is PGD-10 at step eps/4 whatever --steps and --alpha the training attack takes (trades: 0.007)."""
    seen = []
    monkeypatch.setattr(train, "pgd", lambda model, x, y, eps, alpha, steps, **k: seen.append((eps, alpha, steps)) or x)
    x, y = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.ones(4, dtype=torch.int64)
    for flags in ([], ["--loss", "trades"], ["--steps", "3", "--alpha", "0.01"], ["--eps", "16/255"]):
        train.evaluate(WrongUntilPerturbed(), x, y, train.get_args([*TINY, *flags]))
    assert seen == [(8 / 255, 2 / 255, 10)] * 3 + [(16 / 255, 4 / 255, 10)]


def test_finetune_stage_keeps_its_own_best_and_resume_refuses_younger_flags(tmp_path, capsys):
    """--finetune-epochs K: the best checkpoint is one of the K fine-tuned epochs (else the stage could be dropped
    by the choice). A checkpoint written before a flag existed refuses that flag on --resume."""
    from test_cli import assert_user_error, run_here
    from test_data import make_cifar
    make_cifar(tmp_path)
    out = tmp_path / "ft.pt"
    assert train.main(train.get_args(["--data", str(tmp_path), "--epochs", "2", "--finetune-epochs", "1", *TINY,
                                      "--out", str(out)])) == 0
    best = torch.load(tmp_path / "ft.best.pt", weights_only=True)
    assert best["epoch"] == 3 and best["finetune"]
    import json, math
    for row in map(json.loads, open(tmp_path / "ft.jsonl")):  # the mechanism, every epoch: 20 val images, one chunk
        assert row["con_batch"] == 20 and row["con_uniform"] == pytest.approx(math.log(2 * 20 - 1))
        assert row["con_collapse"] < row["con_uniform"]
        assert row["con_covered"] == pytest.approx((row["con_uniform"] - row["con_loss"]) /
                                                   (row["con_uniform"] - row["con_collapse"]))
        assert 0 < row["q_twin"] < 1 and 0 < row["inv_positives"] < 1
        assert all(-1 <= row[f"{s}_{k}"] <= 1 for s in ("head", "backbone") for k in ("twin", "intra", "inter"))

    ckpt = torch.load(out, weights_only=True)
    del ckpt["config"]["train"]["adv_view"]  # as written before --adv-view existed
    torch.save(ckpt, out)
    r = run_here(train, "--resume", "--out", out, "--data", tmp_path, "--adv-view", "same", capsys=capsys)
    assert_user_error(r, "--adv-view", "before")
    ckpt["config"]["train"]["loss"] = "ce"  # a PGD-AT run: --beta is refused as unused, not as "was 1.0"
    torch.save(ckpt, out)
    assert_user_error(run_here(train, "--resume", "--out", out, "--data", tmp_path, "--beta", "2", capsys=capsys),
                      "--loss ce", "does not use --beta")


def recording_backend():
    """A torch.compile backend that runs the traced graphs as they are (aot_autograd, no code generation) and
    records them: (backend, forward graphs, one list per backward graph of its convolution_backward output masks
    [input gradient, weight gradient, bias gradient])."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    forward, backward = [], []

    def fw(gm, _):
        forward.append(gm)
        return make_boxed_func(gm.forward)

    def bw(gm, _):
        backward.append([n.args[-1] for n in gm.graph.nodes if n.target == torch.ops.aten.convolution_backward.default])
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=fw, bw_compiler=bw), forward, backward


@pytest.fixture
def recorded_compile(monkeypatch):
    """torch.compile with the recording backend, for code that calls torch.compile; dynamo's caches emptied
    before and after (its per-function graph limit is shared by every model of the process)."""
    import functools
    backend, forward, backward = recording_backend()
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    yield forward, backward
    torch._dynamo.reset()


def test_train_compile_as_users_type_it(tmp_path, capsys, recorded_compile):
    """train.py --compile (it crashed at the first step: `train_net or net` asked the compiled module for its truth
    value) runs both stages, compiling three graphs (the attack, the update, the fine-tuning update), each at the
    first step of its stage: no recompilation after. Eager autograd.grad(loss, x) skips the weight gradients, a
    compiled backward computes every input's that requires one: the attack's backward graph computes the input
    gradient of all 20 convolutions and no weight gradient (the parameters' requires_grad is off for it), the
    update's every weight's, the fine-tuning update's none (the backbone is frozen)."""
    from test_cli import run_here
    from test_data import make_cifar
    forward, backward = recorded_compile
    make_cifar(tmp_path)
    r = run_here(train, "--compile", "--loss", "anchor", "--data", tmp_path, "--epochs", "1", "--finetune-epochs", "1",
                 *TINY, "--out", tmp_path / "c.pt", capsys=capsys)  # 2 steps an epoch
    assert r.returncode == 0, r.stderr
    assert "compiled" in r.stdout and len(forward) == 3
    attack, update, finetune = backward
    assert [m[:2] for m in attack] == [[True, False]] * 20
    assert [m[1] for m in update] == [True] * 20 and finetune == []
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 2


def test_finetune_lr_is_the_stage_peak_and_refused_without_the_stage():
    """--finetune-lr is the fine-tuning stage's own peak (the stage used to restart at --lr); without a stage the
    flag would do nothing, so it is refused."""
    from cli import CLIError
    args = train.get_args([*TINY, "--finetune-epochs", "2", "--finetune-lr", "0.005"])
    model = train.build_model({"width": 4})
    assert step.make_optimizer(model, args, finetune=True).param_groups[0]["lr"] == 0.005
    assert step.make_optimizer(model, args, finetune=False).param_groups[0]["lr"] == args.lr == 0.2
    with pytest.raises(CLIError, match="--finetune-lr.*--finetune-epochs"):
        train.get_args([*TINY, "--finetune-lr", "0.005"])


def test_amp_on_a_cpu_without_native_bf16_warns(monkeypatch, capsys):
    """bf16 is emulated without avx512_bf16 or amx_bf16 (2-10x slower than float32, docs/speed.md): --amp on such a
    CPU is allowed with one warning; on a CPU with either flag, or where the flags cannot be read, nothing is said."""
    import cli
    for flags, warned in (({"avx2", "fma"}, True), ({"avx2", "amx_bf16"}, False), (set(), False)):
        monkeypatch.setattr(cli, "cpuinfo", lambda field: " ".join(sorted(flags)) if field == "flags" else "")
        monkeypatch.setattr(cli, "WARNED", set())  # once a process: each case starts afresh
        assert train.get_args([*TINY, "--amp"]).amp
        err = capsys.readouterr().err
        assert ("warning: --amp on a CPU without native bf16" in err) == warned and err.count("\n") == int(warned)
    train.get_args(TINY)  # no --amp: nothing to say
    assert capsys.readouterr().err == ""
