"""Tests of attacks.py on a small model trained in conftest.py (`trained_model`). CPU only, ~30 s.

    python -m pytest -q test_attacks.py
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import (_apgd_checkpoints, _apgd_run, _dlr, _dlr_targeted, _margin, _project, _square_p, apgd, cw_l2, fgsm,
                     pgd, square)

EPS = 8 / 255  # the trained model is not robust here: PGD fools nearly everything
MID_EPS = 4 / 255  # partly robust here, so stronger and weaker attacks give different accuracies

# name -> attack(model, x, y, eps) with small budgets: for the contract checks, not for strength
ATTACKS = {
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps),
    "pgd_ce": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4 + 1e-3, 5),
    "pgd_cw": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4 + 1e-3, 5, loss="cw"),
    "pgd_restarts": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4 + 1e-3, 3, restarts=2),
    "apgd_ce": lambda m, x, y, eps: apgd(m, x, y, eps, steps=5),
    "apgd_dlr": lambda m, x, y, eps: apgd(m, x, y, eps, steps=5, loss="dlr"),
    "apgd_t": lambda m, x, y, eps: apgd(m, x, y, eps, steps=5, loss="dlr", targeted=True, n_targets=2),
    "apgd_t_ce": lambda m, x, y, eps: apgd(m, x, y, eps, steps=5, loss="ce", targeted=True, n_targets=2),
    "square": lambda m, x, y, eps: square(m, x, y, eps, queries=20),
}
ALL_ATTACKS = {**ATTACKS, "cw_l2": lambda m, x, y, eps: cw_l2(m, x, y, steps=3, search_steps=2)}


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


# ---------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", ATTACKS)
def test_linf_bound_range_dtype(trained_model, name):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    x_before = x.clone()
    x_adv = ATTACKS[name](model, x, y, MID_EPS)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert torch.equal(x, x_before)  # the input is not modified in place
    delta = (x_adv - x).abs()
    assert delta.max().item() <= MID_EPS + 1e-6
    assert bool((delta <= MID_EPS).all())  # exactly, in float32: rounding never puts a pixel past eps
    assert 0 <= x_adv.min().item() and x_adv.max().item() <= 1
    assert (delta > 0).float().mean() > 0.5  # it did perturb


def test_cw_l2_range(trained_model):
    model, x, y = trained_model
    x_adv = cw_l2(model, x[:16], y[:16], steps=5, search_steps=1, lr=0.05)
    assert x_adv.shape == x[:16].shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert 0 <= x_adv.min().item() and x_adv.max().item() <= 1


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_no_side_effects_on_model(trained_model, name, mode):
    model, x, y = trained_model
    model = copy.deepcopy(model)  # train mode updates BatchNorm statistics: keep the shared model clean
    model.train(mode == "train")
    ALL_ATTACKS[name](model, x[:8], y[:8], EPS)
    assert model.training == (mode == "train")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ATTACKS)
def test_eps_zero_returns_x(trained_model, name):
    model, x, y = trained_model
    x_adv = ATTACKS[name](model, x[:16], y[:16], 0.0)
    assert torch.equal(x_adv, x[:16])


def test_pgd_eps_zero_gives_clean_accuracy(trained_model):
    model, x, y = trained_model
    x_adv = pgd(model, x, y, eps=0.0, alpha=1 / 255, steps=5)
    assert accuracy(model, x_adv, y) == accuracy(model, x, y)


def test_project_never_exceeds_eps():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=generator)
    x[:8] = 1.0 - torch.rand(8, 3, 16, 16, generator=generator) * 1e-6  # near the ends of [0, 1]
    x[8:16] = torch.rand(8, 3, 16, 16, generator=generator) * 1e-6
    for eps in (8 / 255, 0.031, 1e-3, 0.3):
        x_adv = _project(x + 2 * eps * torch.randn(x.shape, generator=generator), x, eps)
        assert bool(((x_adv - x).abs() <= eps).all())
        assert 0 <= x_adv.min() and x_adv.max() <= 1


# ---------------------------------------------------------------- agreement with a plain implementation


def reference_pgd(model, x, y, eps, alpha, steps, loss):
    """Textbook PGD without random start: requires_grad_ on a copy of the input and loss.backward()."""
    model = copy.deepcopy(model)  # .backward() fills the copy's .grad, not the shared model's
    x_adv = x.clone()
    for _ in range(steps):
        x_adv = x_adv.clone().requires_grad_(True)
        logits = model(x_adv)
        if loss == "ce":
            objective = F.cross_entropy(logits, y)  # mean: the sign of the gradient is the same as for the sum
        else:
            true = logits[torch.arange(len(y)), y]
            other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -1e9).max(1).values
            objective = (other - true).sum()
        objective.backward()
        with torch.no_grad():
            x_adv = x_adv + alpha * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_matches_reference(trained_model, loss):
    model, x, y = trained_model
    x, y = x[:8], y[:8]
    ours = pgd(model, x, y, MID_EPS, 1 / 255, 10, random_start=False, loss=loss)
    ref = reference_pgd(model, x, y, MID_EPS, 1 / 255, 10, loss)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # the projections may round differently by one ulp


def test_pgd_callable_loss(trained_model):
    """A callable loss is ascended as it is: cross-entropy written by hand gives PGD-CE, and the TRADES-style KL
    to the clean prediction moves the prediction away from it."""
    model, x, y = trained_model
    x, y = x[:8], y[:8]
    by_hand = lambda logits, y: -F.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    ours = pgd(model, x, y, MID_EPS, 1 / 255, 10, random_start=False, loss=by_hand)
    torch.testing.assert_close(ours, pgd(model, x, y, MID_EPS, 1 / 255, 10, random_start=False), rtol=0, atol=0)
    with torch.no_grad():
        clean_logp = F.log_softmax(model(x), 1)
    kl = lambda logits, y: F.kl_div(F.log_softmax(logits, 1), clean_logp, reduction="none", log_target=True).sum(1)
    x_adv = pgd(model, x, y, MID_EPS, 1 / 255, 10, loss=kl)
    with torch.no_grad():
        assert kl(model(x_adv), y).mean() > kl(model(x), y).mean() + 1e-3


# ---------------------------------------------------------------- strength


def test_accuracy_non_increasing_in_eps(trained_model):
    model, x, y = trained_model
    accs = []
    for eps in (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255):
        torch.manual_seed(0)
        accs.append(accuracy(model, pgd(model, x, y, eps, max(eps, 1e-3) / 4, 10), y))
    assert accs == sorted(accs, reverse=True), accs
    assert accs[0] > 0.8 and accs[-1] < 0.2, accs  # the sweep spans robust to broken


@pytest.fixture(scope="module")
def pgd20_mid(trained_model):
    """PGD-20 accuracy at MID_EPS, the baseline of the strength comparisons."""
    model, x, y = trained_model
    torch.manual_seed(0)
    return accuracy(model, pgd(model, x, y, MID_EPS, MID_EPS / 4, 20), y)


def test_pgd_stronger_than_fgsm(trained_model, pgd20_mid):
    model, x, y = trained_model
    fgsm_acc = accuracy(model, fgsm(model, x, y, MID_EPS), y)
    assert pgd20_mid <= fgsm_acc + 1 / len(y), (pgd20_mid, fgsm_acc)
    assert pgd20_mid < accuracy(model, x, y)


@pytest.mark.parametrize("loss, targeted", [("ce", False), ("dlr", True)])
def test_apgd_at_least_as_strong_as_pgd20(trained_model, pgd20_mid, loss, targeted):
    model, x, y = trained_model
    x_adv = apgd(model, x, y, MID_EPS, steps=20, loss=loss, targeted=targeted, n_targets=3)
    assert accuracy(model, x_adv, y) <= pgd20_mid + 2 / len(y), (accuracy(model, x_adv, y), pgd20_mid)


def test_cw_inf_fools_undefended_model(trained_model):
    model, x, y = trained_model
    torch.manual_seed(0)
    assert accuracy(model, pgd(model, x, y, EPS, EPS / 4, 20, loss="cw"), y) < 0.1


@pytest.fixture(scope="module")
def cw_runs(trained_model):
    """cw_l2 on 32 examples with one and with three binary-search steps (deterministic: no randomness)."""
    model, x, y = trained_model
    x, y = x[:32], y[:32]
    args = dict(c=0.1, steps=30, lr=0.05)
    return x, y, cw_l2(model, x, y, search_steps=1, **args), cw_l2(model, x, y, search_steps=3, **args)


def test_cw_l2_fools_undefended_model(trained_model, cw_runs):
    model = trained_model[0]
    x, y, _, x_adv = cw_runs
    fooled = ~correct(model, x_adv, y)
    unchanged = (x_adv == x).flatten(1).all(1)
    assert fooled.float().mean() > 0.9
    assert bool((fooled | unchanged).all())  # where it failed it returns x itself
    l2 = (x_adv - x).flatten(1).norm(dim=1)[fooled]
    assert l2.max() < 2.0  # a small perturbation: the image's own norm is ~ 9


def test_cw_l2_keeps_smallest_over_search_steps(trained_model, cw_runs):
    model = trained_model[0]
    x, y, one, three = cw_runs
    fooled_one, fooled_three = ~correct(model, one, y), ~correct(model, three, y)
    assert bool((fooled_three | ~fooled_one).all())  # later search steps add successes, never lose them
    l2_one, l2_three = ((a - x).flatten(1).norm(dim=1) for a in (one, three))
    assert bool((l2_three[fooled_one] <= l2_one[fooled_one] + 1e-6).all())
    assert fooled_three.sum() > fooled_one.sum() or bool((l2_three[fooled_one] < l2_one[fooled_one]).any())


def test_restarts_keep_worst_case_per_example(trained_model):
    model, x, y = trained_model
    args = (model, x, y, MID_EPS, MID_EPS / 4, 4)
    torch.manual_seed(1)
    candidates = [pgd(*args, restarts=1) for _ in range(3)]  # the same random starts as restarts=3 draws
    torch.manual_seed(1)
    x_adv = pgd(*args, restarts=3)
    with torch.no_grad():
        logits = [model(c) for c in candidates]
    fooled = torch.stack([z.argmax(1) != y for z in logits])  # (3, N)
    losses = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])  # (3, N)
    same = torch.stack([(c == x_adv).flatten(1).all(1) for c in candidates])  # (3, N)
    assert bool(same.any(0).all())  # every example comes from one of the restarts
    pick = same.float().argmax(0)  # (N,) which restart
    cols = torch.arange(len(y))
    assert torch.equal(fooled[pick, cols], fooled.any(0))  # fooled by any restart stays fooled
    unfooled = ~fooled.any(0)
    assert unfooled.any() and fooled.any(0).any()  # a mix, or the check below proves nothing
    assert torch.equal(losses[pick, cols][unfooled], losses.max(0).values[unfooled])
    assert accuracy(model, x_adv, y) <= accuracy(model, candidates[0], y)


# ---------------------------------------------------------------- losses and the APGD schedule


def test_margin_and_dlr_values():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    y = torch.tensor([0, 0])
    assert torch.equal(_margin(logits, y), torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(_dlr(logits, y), torch.tensor([-2.0 / 3.0, 2.0 / 1.5]))
    # DLR is invariant to shifting and positively scaling the logits
    torch.testing.assert_close(_dlr(5 * logits - 7, y), _dlr(logits, y))
    target = torch.tensor([1, 2])  # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)
    torch.testing.assert_close(_dlr_targeted(logits, y, target), torch.tensor([-2.0 / 3.5, 1.0 / 1.75]))


def test_apgd_checkpoints():
    assert _apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]  # p_j = 0.22, 0.41, ... of the paper
    for steps in (1, 5, 10, 20, 37):
        points = _apgd_checkpoints(steps)
        assert points == sorted(set(points)) and all(1 <= p <= steps for p in points)


def test_apgd_deterministic_and_seeded(trained_model):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    rng_state = torch.get_rng_state()
    for kwargs in (dict(loss="ce"), dict(loss="dlr", targeted=True, n_targets=2)):
        a = apgd(model, x, y, MID_EPS, steps=5, seed=3, **kwargs)
        b = apgd(model, x, y, MID_EPS, steps=5, seed=3, **kwargs)
        c = apgd(model, x, y, MID_EPS, steps=5, seed=4, **kwargs)
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own generator: the global one is untouched


def test_apgd_start_as_autoattack():
    """The random start is AutoAttack's: float32 noise from torch's CPU generator seeded by `seed`, 2 U - 1,
    stretched so that its largest coordinate is at eps."""
    calls = []
    logits = lambda inputs: F.pad(inputs.flatten(1).sum(1, keepdim=True), (0, 2))  # (N, 3): class 0 wins
    logged = lambda inputs: calls.append(inputs.detach().clone()) or logits(inputs)
    x, y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.int64)
    apgd(logged, x, y, 0.1, steps=1, seed=3)
    t = 2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1  # what AutoAttack draws
    torch.testing.assert_close(calls[1], x + 0.1 * t / t.abs().flatten(1).amax(1).view(-1, 1, 1, 1), rtol=0, atol=1e-6)
    assert torch.allclose((calls[1] - x).abs().flatten(1).amax(1), torch.tensor(0.1), atol=1e-6)  # the ball's edge


class PixelModel(nn.Module):
    """Logits (pixel, 0) of a one-pixel image (y = 0: the margin is the pixel, never negative); logs the pixel of
    every call."""

    def __init__(self):
        super().__init__()
        self.visited = []

    def forward(self, x):
        p = x.flatten(1)[:, 0]  # (N,)
        self.visited.append(p.item())
        return torch.stack([p, torch.zeros_like(p)], 1)


def apgd_path(values, signs, steps):
    """The pixels _apgd_run visits (start first) on x = 0.25 with eps = 0.5, where [0, 0.75] is the feasible
    interval and this seed's start is 0, when its j-th loss evaluation returns values[j] with a gradient of sign
    signs[j] (both padded with their last entry). A step of 1 (2 eps) from 0 reaches 0.75, of 0.5 (halved) 0.5."""
    calls = 0

    def scripted(logits, y):
        nonlocal calls
        j, calls = min(calls, len(values) - 1), calls + 1
        p = logits[:, 0]
        return values[j] + signs[min(j, len(signs) - 1)] * (p - p.detach())  # value values[j], slope signs[j]

    model = PixelModel()
    x, y = torch.full((1, 1, 1, 1), 0.25), torch.zeros(1, dtype=torch.int64)
    _apgd_run(model, x, y, 0.5, steps, scripted, torch.Generator().manual_seed(3))
    assert len(model.visited) == steps + 1 and model.visited[0] == 0.0
    return model.visited


def test_apgd_condition2_off_at_first_checkpoint():
    """25 steps: checkpoints after steps 5 and 9. The loss never beats the start's (10), yet at the first
    checkpoint the step is not halved (AutoAttack's reduced_last_check starts at 1); at the second it is."""
    path = apgd_path([10, 1, 2, 3, 4, 5, 6, 7, 8, 9], [-1] * 5 + [1] * 5, steps=25)
    assert path[:6] == [0.0] * 6  # pushed against 0; five of the five steps raised the loss: no condition 1
    assert path[6] == 0.5625  # 0 + 0.75 * (0.75 - 0): the full step 2 eps, from where it was
    assert path[7:10] == [0.75] * 3  # four raising steps again, and still no new best: condition 2 halves
    assert path[10] == 0.0  # back to the start (the best point) with its gradient, pointing to 0


def test_apgd_condition1_halves_at_exactly_rho():
    """20 steps: first checkpoint after step 4. Exactly 3 = 0.75 * 4 of the 4 steps raise the loss (step 0 is
    compared with 0) and the best loss rose: AutoAttack's t <= k * 0.75 halves the step."""
    path = apgd_path([0, 1, 2, 3, 2], [-1, -1, -1, 1, 1], steps=20)
    assert path[:5] == [0.0] * 4 + [0.5625]  # the best point is the 4th iterate (loss 3), at 0
    assert path[5] == 0.375  # from the best point with its gradient (+): 0 + 0.75 * 0.5, the halved step
    # with one more raising step (4 > 3) the step is not halved: it goes on from 0.5625 and reaches 0.75
    assert apgd_path([0, 1, 2, 3, 4], [-1, -1, -1, 1, 1], steps=20)[5] == 0.75


def test_apgd_momentum_after_halving():
    """After a halving the iterate restarts from the best point, but the previous iterate stays the one before the
    abandoned iterate (AutoAttack's x_adv_old): the next step's momentum is best - previous, not 0."""
    path = apgd_path([0, 5, 1, 0.5, 0.2], [1, -1, -1, -1, -1], steps=20)
    assert path[:5] == [0.0, 0.75, 0.375, 0.0, 0.0]  # best at 0.75 (loss 5); 1 raising step in 4: halve
    best, previous, z = 0.75, path[3], 0.25  # z: the halved step of 0.5 from the best point, down its gradient
    assert path[5] == best + 0.75 * (z - best) + 0.25 * (best - previous) == 0.5625


def test_apgd_counts_steps_across_a_restart():
    """A step counts as raising the loss when its iterate's loss beats the last iterate visited: after a restart
    from the best point, the abandoned one (AutoAttack's loss_steps), not the best loss."""
    # start's loss 10 stays the best; checkpoint 4 halves (1 raising step); then 3 of the 3 steps to checkpoint 7
    # raise the loss from 0.3 (the abandoned iterate) to 3: no condition 1, and condition 2 is off (halved at 4)
    path = apgd_path([10, 1, 0.5, 0.4, 0.3, 1, 2, 3], [-1] * 7 + [1], steps=20)
    assert path[:8] == [0.0] * 8
    assert path[8] == 0.375  # the gradient at the 7th iterate (+), the step halved once: 0.75 * 0.5


def test_apgd_first_step_compared_with_zero():
    """At the first checkpoint AutoAttack compares step 0's loss with an unfilled (zero) row of its loss history,
    not with the start's loss: with 10 steps (checkpoints after steps 2, 3, ...) a first loss of 1 counts as
    raising the loss although the start's was 10, one of -1 does not."""
    assert apgd_path([10, 1, 2], [-1, -1, 1], steps=10)[3] == 0.5625  # 2 of 2 raised: the full step
    assert apgd_path([10, -1, 2], [-1, -1, 1], steps=10)[3] == 0.0  # 1 of 2: halved, back to the start


# ---------------------------------------------------------------- Square Attack

SQUARE_QUERIES = 100  # the budget of the logged run: at EPS it fools about half the images, the rest stay robust


class QueryLog(nn.Module):
    """Wraps a model; per call records which of the images x each input row is (the one within eps of it),
    the row itself and its margin."""

    def __init__(self, model, x, y, eps):
        super().__init__()
        self.model, self.x, self.y, self.eps, self.calls = model, x, y, eps, []

    def forward(self, inputs):
        logits = self.model(inputs)
        dist = (inputs[:, None] - self.x[None]).abs().flatten(2).amax(2)  # (Q, N) L-inf distance to each image
        idx = dist.argmin(1)  # (Q,)
        assert bool((dist.min(1).values <= self.eps).all()) and len(set(idx.tolist())) == len(idx)
        self.calls.append((idx, inputs.detach().clone(), _margin(logits.detach().float(), self.y[idx])))
        return logits

    def history(self, i):
        """[(input [C, H, W], margin)] of image i, in query order."""
        return [(rows[k], margin[k].item()) for idx, rows, margin in self.calls for k in (idx == i).nonzero()[:, 0]]


@pytest.fixture(scope="module")
def square_log(trained_model):
    """One logged square run at EPS on 24 images, the first 4 relabelled so the clean input is misclassified."""
    model, x, y = trained_model
    x, y = x[:24], y[:24].clone()
    y[:4] = (y[:4] + 1) % 10
    assert not correct(model, x[:4], y[:4]).any()
    log = QueryLog(model, x, y, EPS)
    return log, x, y, square(log, x, y, EPS, queries=SQUARE_QUERIES)


def test_square_no_queries_on_fooled_images(square_log):
    log, x, y, x_adv = square_log
    histories = [log.history(i) for i in range(len(y))]
    assert all(len(h) == 1 for h in histories[:4])  # clean mistakes: the clean evaluation only
    assert torch.equal(x_adv[:4], x[:4])
    for h in histories:  # a query that fools an image (margin <= 0, as AutoAttack tests it) is its last one
        assert all(margin > 0 for _, margin in h[:-1])
    assert sum(len(h) > 1 and h[-1][1] < 0 for h in histories) >= 3  # some were fooled by the search itself


def test_square_query_budget(trained_model, square_log):
    """`queries` updates after the clean evaluation and the stripes, as AutoAttack's n_queries."""
    log, x, y, _ = square_log
    histories = [log.history(i) for i in range(len(y))]
    assert max(len(h) for h in histories) <= SQUARE_QUERIES + 2
    robust = [h for h in histories if h[-1][1] > 0]
    assert len(robust) >= 3 and all(len(h) == SQUARE_QUERIES + 2 for h in robust)  # the whole budget, not one more
    log = QueryLog(trained_model[0], x, y, EPS)
    square(log, x, y, EPS, queries=1)  # the clean evaluation, the stripes on the 20 correct images, one update
    assert len(log.calls) == 3 and [len(c[0]) for c in log.calls[:2]] == [24, 20] and len(log.calls[2][0]) <= 20
    assert torch.equal(square(log, x, y, 0.0), x) and len(log.calls) == 3  # eps 0: nothing to search, no query


def test_square_search(square_log):
    """Replays the search from the log: every update changes, inside one square of the scheduled side that never
    reaches the last row or column (AutoAttack's corner range), each channel to one sign of x +- eps, and is kept
    only where it lowers the margin."""
    log, x, y, x_adv = square_log
    first_rows = []
    for i in range(4, len(y)):
        h = log.history(i)
        stripes = h[1][0] - x[i]  # (C, H, W)
        assert bool((stripes.sign() == stripes.sign()[:, :1]).all())  # constant down each column
        best, best_margin = h[1]
        for it, (cand, margin) in enumerate(h[2:]):
            side = max(round(math.sqrt(_square_p(it, SQUARE_QUERIES, 0.8) * 16 * 16)), 1)
            at_vertex = ((cand - x[i]).abs() - EPS).abs() < 1e-6
            assert bool((at_vertex | (cand == 0) | (cand == 1)).all())
            changed = cand != best  # (C, H, W): may be empty, a query spent on the current point as in AutoAttack
            rows, cols = changed.any(2).any(0).nonzero()[:, 0], changed.any(1).any(0).nonzero()[:, 0]
            if len(rows):
                assert rows[-1] - rows[0] < side and cols[-1] - cols[0] < side
                assert side < 16 and rows[-1] < 15 and cols[-1] < 15  # the corner is drawn in [0, 16 - side)
            if it == 0:
                first_rows.append(len(rows) == side)  # stripes are constant down columns: the square's full height
            for step, ch in zip(cand - best, changed):  # one sign per channel
                assert len(set(step[ch].sign().tolist())) <= 1
            if margin < best_margin:
                best, best_margin = cand, margin
        assert torch.equal(x_adv[i], best)  # returns the lowest-margin point of the search
    assert all(first_rows) and len(first_rows) >= 5


class NeverFooled(nn.Module):
    """Logits (1 + sum of the pixels, 0, 0): margin > 0 for y = 0 whatever the input; logs the batch size of
    every call."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x):
        self.batch_sizes.append(len(x))
        return F.pad(1 + x.flatten(1).sum(1, keepdim=True), (0, 2))  # (N, 3)


def test_square_calls_when_never_fooled():
    """An image never fooled costs the clean evaluation, the stripes and `queries` updates: AutoAttack's count."""
    x, y = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(3, dtype=torch.int64)
    for queries in (1, 7):
        model = NeverFooled()
        square(model, x, y, EPS, queries=queries)
        assert model.batch_sizes == [3] * (queries + 2)


def test_square_tie_counts_as_fooled():
    """AutoAttack attacks the images whose clean argmax is y and queries again only those of margin > 0: with
    the logits tied (1, 1, 0), y = 0 is attacked and its stripes, a tie, end the search; y = 1 is a clean mistake."""
    calls = []
    tied = lambda inputs: calls.append(len(inputs)) or torch.tensor([1.0, 1.0, 0.0]).repeat(len(inputs), 1)
    x = torch.full((2, 3, 4, 4), 0.5)
    x_adv = square(tied, x, torch.tensor([0, 1]), EPS, queries=10)
    assert calls == [2, 1]  # the clean evaluation, then the stripes of image 0 only
    assert not torch.equal(x_adv[0], x[0]) and torch.equal(x_adv[1], x[1])


def test_square_corner_range_and_unchanged_candidates():
    """2x2 one-channel images: after update 10 the squares are 1 pixel, and AutoAttack draws the corner as
    floor((2 - 1) U[0, 1)) = 0, so only pixel (0, 0) ever changes; a candidate whose sign that pixel already
    has is the current point, queried all the same (AutoAttack does not redraw it)."""
    x, y = torch.tensor([0.2, 0.5, 0.8]).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone(), torch.zeros(3, dtype=torch.int64)
    log = QueryLog(NeverFooled(), x, y, EPS)
    square(log, x, y, EPS, queries=40)
    unchanged = 0
    for i in range(3):
        h = log.history(i)
        assert len(h) == 42  # clean, stripes, 40 updates
        best, best_margin = h[1]
        for it, (cand, margin) in enumerate(h[2:]):
            changed = cand != best  # (1, 2, 2)
            if it > 10:
                assert not changed.flatten()[1:].any()  # pixel (0, 0) only
                unchanged += not changed.any()
            if margin < best_margin:
                best, best_margin = cand, margin
    assert unchanged > 0


def test_square_p_schedule():
    its = [0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 6000, 6001, 8000, 8001, 9999]
    for rescale in (False, True):  # at 10,000 queries the two agree
        assert [_square_p(it, 10000, 0.8, rescale) for it in its] == [0.8 / 2 ** (k // 2) for k in range(len(its))]
    # AutoAttack's standard version cuts the schedule at its budget: at 5,000 queries p ends at p_init / 128
    assert [_square_p(it, 5000, 0.5) for it in its[:14]] == [0.5 / 2 ** (k // 2) for k in range(14)]
    assert _square_p(4999, 5000, 0.5) == 0.5 / 128
    # rescale stretches it: update it of 5000 acts as update 2 * it of 10,000
    its = [0, 5, 6, 25, 26, 100, 101, 3999, 4000, 4001, 4999]
    halvings = [0, 0, 1, 1, 2, 2, 3, 8, 8, 9, 9]
    assert [_square_p(it, 5000, 0.5, rescale=True) for it in its] == [0.5 / 2**k for k in halvings]


def test_square_lowers_accuracy(trained_model):
    model, x, y = trained_model
    x_adv = square(model, x, y, EPS, queries=200)
    assert bool(((x_adv - x).abs() <= EPS).all()) and 0 <= x_adv.min() and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.5, accuracy(model, x_adv, y)


def test_square_deterministic_and_seeded(trained_model):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    rng_state = torch.get_rng_state()
    a, b, c = (square(model, x, y, MID_EPS, queries=30, seed=seed) for seed in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng_state)  # its own generator: the global one is untouched


# ---------------------------------------------------------------- calling contexts


@pytest.mark.parametrize("name", ALL_ATTACKS)
def test_same_result_inside_no_grad(trained_model, name):
    model, x, y = trained_model
    x, y = x[:8], y[:8]
    torch.manual_seed(0)
    outside = ALL_ATTACKS[name](model, x, y, MID_EPS)
    torch.manual_seed(0)
    with torch.no_grad():
        inside = ALL_ATTACKS[name](model, x, y, MID_EPS)
    assert torch.equal(inside, outside)


def test_input_requiring_grad(trained_model):
    model, x, y = trained_model
    x = x[:8].clone().requires_grad_(True)
    x_adv = pgd(model, x, y[:8], MID_EPS, MID_EPS / 4, 2)
    assert not x_adv.requires_grad and x.grad is None


@pytest.mark.parametrize("attack", [lambda m, x, y: pgd(m, x, y, EPS, EPS / 4, 10),
                                    lambda m, x, y: square(m, x, y, EPS, queries=200)], ids=["pgd", "square"])
def test_under_autocast(trained_model, attack):
    model, x, y = trained_model
    x, y = x[:16], y[:16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = attack(model, x, y)
    assert x_adv.dtype == torch.float32
    assert bool(((x_adv - x).abs() <= EPS).all())
    assert accuracy(model, x_adv, y) < 0.5


# ---------------------------------------------------------------- bad arguments


class _MustNotRun(nn.Module):
    """The arguments are checked before any forward pass."""

    def forward(self, x):
        raise AssertionError("the model ran before the arguments were checked")


_X, _Y = torch.full((2, 3, 4, 4), 0.5), torch.zeros(2, dtype=torch.int64)
BAD = [
    (fgsm, dict(eps=-0.1), "eps"),
    (fgsm, dict(eps=math.nan), "eps"),
    (fgsm, dict(eps=math.inf), "eps"),
    (pgd, dict(eps=0.03, alpha=0.0, steps=1), "alpha"),
    (pgd, dict(eps=0.03, alpha=-0.01, steps=1), "alpha"),
    (pgd, dict(eps=-0.03, alpha=0.01, steps=1), "eps"),
    (pgd, dict(eps=0.03, alpha=0.01, steps=0), "steps"),
    (pgd, dict(eps=0.03, alpha=0.01, steps=2.5), "steps"),
    (pgd, dict(eps=0.03, alpha=0.01, steps=1, restarts=0), "restarts"),
    (pgd, dict(eps=0.03, alpha=0.01, steps=1, loss="dlr"), "loss"),
    (apgd, dict(eps=0.03, loss="cw"), "loss"),
    (apgd, dict(eps=0.03, steps=0), "steps"),
    (apgd, dict(eps=0.03, n_targets=0), "n_targets"),
    (apgd, dict(eps=math.nan), "eps"),
    (cw_l2, dict(c=0.0), "c"),
    (cw_l2, dict(c=-1.0), "c"),
    (cw_l2, dict(kappa=-1.0), "kappa"),
    (cw_l2, dict(steps=0), "steps"),
    (cw_l2, dict(lr=0.0), "lr"),
    (cw_l2, dict(search_steps=0), "search_steps"),
    (square, dict(eps=0.03, queries=0), "queries"),
    (square, dict(eps=0.03, queries=1.5), "queries"),
    (square, dict(eps=-1.0), "eps"),
    (square, dict(eps=math.inf), "eps"),
    (square, dict(eps=0.03, p_init=0.0), "p_init"),
    (square, dict(eps=0.03, p_init=1.5), "p_init"),
    (square, dict(eps=0.03, p_init=math.nan), "p_init"),
]
EPS_KW = {fgsm: dict(eps=0.03), pgd: dict(eps=0.03, alpha=0.01, steps=1), apgd: dict(eps=0.03), cw_l2: {},
          square: dict(eps=0.03)}
for _fn, _kw in EPS_KW.items():
    BAD += [
        (_fn, dict(_kw, x=_X[0]), "x must be a 4-D"),
        (_fn, dict(_kw, x=_X + 0.6), r"x must lie in \[0, 1\]"),
        (_fn, dict(_kw, x=torch.full_like(_X, math.nan)), r"x must lie in \[0, 1\]"),
        (_fn, dict(_kw, y=_Y[:1]), "y must be int64 of shape"),
        (_fn, dict(_kw, y=_Y[:, None]), "y must be int64 of shape"),
        (_fn, dict(_kw, y=_Y.int()), "y must be int64 of shape"),
    ]


@pytest.mark.parametrize("fn, kwargs, match", BAD, ids=[f"{fn.__name__}-{m}-{i}" for i, (fn, _, m) in enumerate(BAD)])
def test_bad_arguments_raise(fn, kwargs, match):
    kwargs = {"x": _X, "y": _Y, **kwargs}
    with pytest.raises(ValueError, match=match):
        fn(_MustNotRun(), **kwargs)


def test_apgd_dlr_needs_enough_classes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))  # 3 classes: the targeted DLR reads z_pi4
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd(model, _X, _Y, 0.03, steps=1, loss="dlr", targeted=True)
    apgd(model, _X, _Y, 0.03, steps=1, loss="dlr")  # untargeted DLR needs only 3
