"""Adversarial attacks as explicit loops: FGSM, PGD (CE or CW margin), Carlini-Wagner L2, Auto-PGD, Square.

    from attacks import fgsm, pgd, cw_l2, apgd, square
    model.eval()                                                   # the caller picks the mode; attacks keep it
    x_adv = fgsm(model, x, y, eps=8/255)                           # Goodfellow et al. 2015
    x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=20)     # PGD-20, Madry et al. 2018
    x_adv = pgd(model, x, y, 8/255, 2/255, 30, loss='cw')          # CW-inf: PGD on the Carlini-Wagner margin
    x_adv = apgd(model, x, y, eps=8/255, loss='ce')                # APGD-CE, Croce & Hein 2020
    x_adv = apgd(model, x, y, eps=8/255, loss='dlr', targeted=True)  # APGD-T (targeted DLR, 9 targets)
    x_adv = square(model, x, y, eps=8/255, queries=5000)           # Square Attack, Andriushchenko et al. 2020
    x_adv = cw_l2(model, x, y)                                     # Carlini & Wagner 2017, L2
    robust_acc = (model(x_adv).argmax(1) == y).float().mean()

Every attack takes x float [N, 3, H, W] in [0, 1], y int64 [N] and a model that maps [0, 1] images to logits
(normalization inside the model, eps in pixel units: AutoAttack's contract), and returns a detached x_adv in
[0, 1] of x's dtype and device; L-inf attacks stay within eps of x. Gradients (square needs none) are taken
with torch.autograd.grad on the input only, so the model's parameters never get a .grad, and its train/eval mode
is left alone. The attacks work inside torch.no_grad() and under torch.autocast (losses in float32).
"""
import functools
import math

import torch
import torch.nn.functional as F

RHO = 0.75  # APGD: halve the step when at most this fraction of the steps since the last checkpoint raised the loss


# ---------------------------------------------------------------- argument checks


def check_batch(x, y, check_range=True):
    """ValueError unless x is [N, C, H, W] in [0, 1] and y is int64 [N]; returns x detached. The range check
    costs a host sync; check_range=False skips it."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D batch [N, 3, H, W], got shape {tuple(x.shape)}")
    if y.shape != x.shape[:1] or y.dtype != torch.int64:
        raise ValueError(f"y must be int64 of shape [N] = [{x.shape[0]}], got {y.dtype} {tuple(y.shape)}")
    x = x.detach()
    if check_range and x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x))  # one check per call, not per step
        if not (lo >= 0 and hi <= 1):  # written so that NaN fails too
            raise ValueError(f"x must lie in [0, 1] (normalization is inside the model), got [{lo:.4g}, {hi:.4g}]")
    return x


def _check_number(name, value, positive=False):
    """value as a float; ValueError unless it is finite and >= 0 (> 0 if positive)."""
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_count(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------- losses, projection, gradient


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")  # (N,)


def _margin(logits, y):
    """Carlini-Wagner margin z_y - max_{i != y} z_i, (N,): negative means fooled (0 is a tie)."""
    true = logits.gather(1, y[:, None]).squeeze(1)  # (N,)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)  # (N,) best wrong class
    return true - other


def _neg_margin(logits, y):
    return -_margin(logits, y)  # the CW-inf loss: PGD maximizes it


def _dlr(logits, y):
    """Difference of Logits Ratio (Croce & Hein 2020): the margin over z_pi1 - z_pi3, invariant to logit scale."""
    z = logits.sort(1, descending=True).values  # (N, C)
    return -_margin(logits, y) / (z[:, 0] - z[:, 2] + 1e-12)


def _ce_targeted(logits, y, target):
    return -F.cross_entropy(logits, target, reduction="none")  # (N,) ascending it pulls toward the target


def _dlr_targeted(logits, y, target):
    z = logits.sort(1, descending=True).values  # (N, C)
    gap = logits.gather(1, y[:, None]) - logits.gather(1, target[:, None])  # (N, 1) z_y - z_t
    return -gap.squeeze(1) / (z[:, 0] - (z[:, 2] + z[:, 3]) / 2 + 1e-12)


def _project(x_adv, x, eps):
    """The nearest point to x_adv in the L-inf ball of radius eps around x, inside [0, 1]."""
    x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    # x + delta rounds to the nearest float, which can land one ulp beyond eps: step those back toward x
    over = (x_adv - x).abs() > eps  # (N, C, H, W), almost always all False
    return torch.where(over, torch.nextafter(x_adv, x), x_adv)


def _input_grad(model, x_adv, y, loss_fn):
    """Gradient of sum_i loss_fn(model(x_adv), y)_i w.r.t. x_adv only; also the per-example loss and logits.

    The sum (not the mean) keeps the gradient of each example independent of the batch size. autograd.grad
    w.r.t. the input leaves the parameters' .grad untouched, and enable_grad makes it work under no_grad().
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv).float()  # (N, K) float32 even under autocast
        loss = loss_fn(logits, y)  # (N,)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return grad, loss.detach(), logits.detach()


# ---------------------------------------------------------------- FGSM and PGD


def fgsm(model, x, y, eps):
    """One signed-gradient step of cross-entropy of size eps (Goodfellow et al. 2015)."""
    x = check_batch(x, y)
    eps = _check_number("eps", eps)
    grad = _input_grad(model, x, y, _ce)[0]  # (N, C, H, W)
    return _project(x + eps * grad.sign(), x, eps)


def pgd(model, x, y, eps, alpha, steps, random_start=True, restarts=1, loss="ce", check_range=True):
    """L-inf PGD (Madry et al. 2018): `steps` signed-gradient steps of size alpha, projected on the eps-ball.

    loss='ce' ascends cross-entropy; loss='cw' ascends the Carlini-Wagner margin max_{i!=y} z_i - z_y (CW-inf);
    a callable loss(logits [N, K] float32, y) -> [N] is ascended as it is.
    random_start=True draws the start uniformly in the ball (from torch's global generator); a float s starts at
    x + s * N(0, 1) instead (TRADES's code: 0.001); False starts at x. With restarts > 1 each example keeps its
    worst case: fooled by any restart stays fooled, otherwise the restart of highest loss. check_range=False
    skips the check that x lies in [0, 1] and its host sync (for a training loop whose x is in range by
    construction).
    """
    x = check_batch(x, y, check_range)
    eps = _check_number("eps", eps)
    alpha = _check_number("alpha", alpha, positive=True)
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    if not isinstance(random_start, bool):  # a float: the std of a Gaussian start (an int 1 is not True here)
        if not isinstance(random_start, float):
            raise ValueError(f"random_start must be True, False or a float std, got {random_start!r}")
        random_start = _check_number("random_start", random_start, positive=True)
    if callable(loss):  # e.g. TRADES's KL to the clean prediction, in train.py
        loss_fn = loss
    else:
        _check_choice("loss", loss, ("ce", "cw"))
        loss_fn = _ce if loss == "ce" else _neg_margin
    best = best_fooled = best_loss = None
    for _ in range(restarts):
        x_adv = x
        if random_start is True:
            x_adv = _project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        elif random_start:  # a Gaussian start of std random_start
            x_adv = _project(x + random_start * torch.randn_like(x), x, eps)
        for _ in range(steps):  # the training hot loop: no host syncs in here
            grad = _input_grad(model, x_adv, y, loss_fn)[0]  # (N, C, H, W)
            x_adv = _project(x_adv + alpha * grad.sign(), x, eps)
        if restarts == 1:
            return x_adv  # nothing to compare against: skip the evaluation pass
        with torch.no_grad():
            logits = model(x_adv).float()  # (N, K)
        fooled, run_loss = logits.argmax(1) != y, loss_fn(logits, y)  # (N,), (N,)
        if best is None:
            best, best_fooled, best_loss = x_adv, fooled, run_loss
            continue
        # a fooled example stays fooled; among the unfooled the higher loss wins
        take = (fooled & ~best_fooled) | (~fooled & ~best_fooled & (run_loss > best_loss))  # (N,)
        best = torch.where(take[:, None, None, None], x_adv, best)
        best_fooled, best_loss = best_fooled | fooled, torch.where(take, run_loss, best_loss)
    return best


# ---------------------------------------------------------------- Carlini-Wagner L2


def cw_l2(model, x, y, c=1.0, kappa=0.0, steps=100, lr=0.01, search_steps=5):
    """Carlini & Wagner (2017) L2 attack, untargeted, with a per-example binary search over the constant c.

    Minimizes ||x_adv - x||_2^2 + c * max(z_y - max_{i!=y} z_i, -kappa) over w with x_adv = (tanh(w) + 1) / 2,
    by Adam. Returns per example the successful x_adv (margin < -kappa) of smallest L2 over all search steps,
    and x itself where none was found.
    """
    x = check_batch(x, y)
    c = _check_number("c", c, positive=True)
    kappa = _check_number("kappa", kappa)
    lr = _check_number("lr", lr, positive=True)
    _check_count("steps", steps)
    _check_count("search_steps", search_steps)
    n, view = x.shape[0], (-1, 1, 1, 1)
    const = torch.full((n,), c, device=x.device)  # (N,) per-example c
    lo, hi = torch.zeros_like(const), torch.full_like(const, math.inf)  # (N,) search bounds on c
    best, best_l2 = x.clone(), torch.full_like(const, math.inf)  # (N, C, H, W), (N,)
    w_start = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))  # clamp: atanh(+-1) is inf

    def margin_loss(logits, y):
        return const * _margin(logits, y).clamp(min=-kappa)  # (N,)

    for _ in range(search_steps):
        w = w_start.clone()
        opt = torch.optim.Adam([w], lr=lr)  # optimizes w alone, never the model's parameters
        found = torch.zeros(n, dtype=torch.bool, device=x.device)  # (N,) success in this search step
        for _ in range(steps):
            x_adv = (torch.tanh(w) + 1) / 2  # (N, C, H, W) in [0, 1] by construction
            grad, _, logits = _input_grad(model, x_adv, y, margin_loss)
            l2 = (x_adv - x).flatten(1).float().pow(2).sum(1)  # (N,)
            success = _margin(logits, y) < -kappa  # (N,)
            better = success & (l2 < best_l2)
            best = torch.where(better.view(view), x_adv, best)
            best_l2 = torch.where(better, l2, best_l2)
            found |= success
            # chain rule: d/dx_adv of the L2 term is 2 (x_adv - x), and dx_adv/dw = 2 x_adv (1 - x_adv)
            w.grad = (grad + 2 * (x_adv - x)) * 2 * x_adv * (1 - x_adv)
            opt.step()
        # binary search: success bounds c from above; failure from below, growing c tenfold until bounded
        hi = torch.where(found, torch.minimum(hi, const), hi)
        lo = torch.where(found, lo, torch.maximum(lo, const))
        const = torch.where(found | hi.isfinite(), (lo + hi) / 2, const * 10)
    return best


# ---------------------------------------------------------------- Auto-PGD


def _apgd_checkpoints(steps):
    """Iterations w_j = p_j * steps after which APGD may halve its step: p = 0, .22, .41, .57, .70, ...

    The gap p_{j+1} - p_j shrinks by 0.03 a time down to 0.06; integer arithmetic avoids 0.22 + 0.19 = 0.41000001.
    """
    points, w, gap = [], 0, max(steps * 22 // 100, 1)
    shrink, min_gap = max(steps * 3 // 100, 1), max(steps * 6 // 100, 1)
    while w + gap <= steps:
        w += gap
        points.append(w)
        gap = max(gap - shrink, min_gap)
    return points


def _apgd_run(model, x, y, eps, steps, loss_fn, generator):
    """One APGD run (Croce & Hein 2020, Alg. 1) as AutoAttack's autopgd_base.py runs it; returns the lowest-margin
    iterate per example and its margin. `generator` is a CPU generator: the start is drawn there, as AutoAttack
    draws it, so a seed gives the same start on every device."""
    view = (-1, 1, 1, 1)
    checkpoints = set(_apgd_checkpoints(steps))
    # uniform noise in [-1, 1] stretched so that its largest coordinate is +-1 (AutoAttack normalizes it), float32
    noise = 2 * torch.rand(x.shape, generator=generator) - 1  # (N, C, H, W) on the CPU
    noise = noise / (noise.abs().flatten(1).amax(1).view(view) + 1e-12)
    x_adv = _project(x + eps * noise.to(x.device, x.dtype), x, eps)
    grad, loss, logits = _input_grad(model, x_adv, y, loss_fn)
    best, best_margin = x_adv, _margin(logits, y)  # the return value: most fooled point seen
    x_max, grad_max, loss_max = x_adv, grad, loss  # highest loss seen: where a halved step restarts
    step = torch.full((x.shape[0],), 2 * eps, device=x.device, dtype=x.dtype).view(view)  # (N, 1, 1, 1)
    x_prev, n_up, last_check = x_adv, torch.zeros_like(loss), 0
    # a step raised the loss if its iterate's loss beats the last iterate's. Step 0 is compared with 0, not with
    # the start's loss: AutoAttack reads an unfilled (zero) row of its loss history there
    last_loss = torch.zeros_like(loss)  # (N,)
    # halved "at the last check" from the start: condition 2 is off at the first checkpoint (reduced_last_check = 1)
    loss_max_at_check, halved_at_check = loss_max, torch.ones_like(loss, dtype=torch.bool)
    for i in range(steps):
        a = 1.0 if i == 0 else 0.75  # weight of the new step against the last move (momentum 1 - a)
        z = _project(x_adv + step * grad.sign(), x, eps)
        x_prev, x_adv = x_adv, _project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x, eps)
        grad, loss, logits = _input_grad(model, x_adv, y, loss_fn)
        n_up += loss > last_loss  # (N,) across a restart too: the new iterate against the abandoned one
        last_loss, margin = loss, _margin(logits, y)
        better = margin < best_margin
        best, best_margin = torch.where(better.view(view), x_adv, best), torch.where(better, margin, best_margin)
        up = loss > loss_max
        x_max, grad_max = torch.where(up.view(view), x_adv, x_max), torch.where(up.view(view), grad, grad_max)
        loss_max = torch.where(up, loss, loss_max)
        if i + 1 in checkpoints:
            # condition 1: at most RHO of the steps since the last checkpoint raised the loss (AutoAttack's
            # t <= k * 0.75); condition 2: the best loss did not rise since then and the step was not halved there
            halve = (n_up <= RHO * (i + 1 - last_check)) | (~halved_at_check & (loss_max <= loss_max_at_check))
            h = halve.view(view)
            step = torch.where(h, step / 2, step)
            # the halved examples restart from their best point and its gradient; x_prev stays the iterate before
            # the abandoned one, so the next step's momentum is x_max - x_prev (AutoAttack keeps x_adv_old)
            x_adv, grad = torch.where(h, x_max, x_adv), torch.where(h, grad_max, grad)
            halved_at_check, loss_max_at_check, n_up, last_check = halve, loss_max, torch.zeros_like(n_up), i + 1
    return best, best_margin


def apgd(model, x, y, eps, steps=100, loss="ce", targeted=False, n_targets=9, seed=0):
    """Auto-PGD, L-inf (Croce & Hein 2020): PGD with momentum and a step size that halves itself.

    loss='ce' or 'dlr'. targeted=True runs once per target class t among the n_targets most likely wrong classes
    on the clean input, on the examples not yet fooled, maximizing the targeted DLR loss
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (APGD-T), or -CE(t) with loss='ce'. Success is
    misclassification (argmax != y) in every variant. The step-size rule, checkpoints and restarts follow
    AutoAttack's autopgd_base.py. The random starts come from a CPU generator seeded by `seed`, as AutoAttack
    draws them from torch's CPU generator: a call is reproducible, with the same starts on every device.
    Returns per example the iterate of lowest margin z_y - max_{i!=y} z_i over all runs (x itself if the clean
    input already had the lowest); AutoAttack returns the last misclassified iterate, or x: the same accuracy.
    """
    x = check_batch(x, y)
    eps = _check_number("eps", eps)
    _check_count("steps", steps)
    _check_count("n_targets", n_targets)
    _check_choice("loss", loss, ("ce", "dlr"))
    generator = torch.Generator().manual_seed(seed)  # on the CPU: see _apgd_run
    with torch.no_grad():
        logits = model(x).float()  # (N, K) clean logits: the starting margin and the target ranking
    needed = 4 if targeted and loss == "dlr" else 3 if loss == "dlr" else 2  # the DLR denominators read z_pi3, z_pi4
    if logits.shape[1] < needed:
        raise ValueError(f"loss={loss!r} (targeted={targeted}) needs at least {needed} classes, got {logits.shape[1]}")
    best, best_margin = x.clone(), _margin(logits, y)  # a clean mistake already counts as fooled
    if targeted:
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)  # (N, K) y last
        targets = list(ranked[:, : min(n_targets, logits.shape[1] - 1)].T)  # each (N,): k-th likeliest wrong class
    else:
        targets = [None]
    for target in targets:
        todo = (best_margin >= 0).nonzero().squeeze(1)  # (M,) the examples not fooled yet
        if todo.numel() == 0:
            break
        if target is None:
            loss_fn = _ce if loss == "ce" else _dlr
        else:
            loss_fn = functools.partial(_dlr_targeted if loss == "dlr" else _ce_targeted, target=target[todo])
        adv, margin = _apgd_run(model, x[todo], y[todo], eps, steps, loss_fn, generator)
        better = margin < best_margin[todo]  # (M,)
        best[todo[better]], best_margin[todo[better]] = adv[better], margin[better]
    return best


# ---------------------------------------------------------------- Square Attack


def _square_p(it, queries, p_init, rescale=False):
    """Fraction p of the image that update `it` (0-based) resamples: the paper's schedule for 10,000 queries,
    p_init halved after updates 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000; with rescale, stretched to
    `queries` (the Square paper's code), without it cut at `queries` (AutoAttack's standard version)."""
    if rescale:
        it = it * 10000 // queries  # the same schedule shape for any budget
    return p_init / 2 ** sum(it > b for b in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def square(model, x, y, eps, queries=5000, p_init=0.8, seed=0, rescale=False):
    """L-inf Square Attack (Andriushchenko et al. 2020), untargeted, as AutoAttack's standard version runs it.

    A random search that reads only the logits: from vertical stripes x +- eps, each update sets a random square
    of side round(sqrt(p * H * W)) to x +- eps (one random sign per channel) and keeps it where it lowers the
    margin z_y - max_{i!=y} z_i; p shrinks by `_square_p`, on the 10,000-query schedule cut at `queries` as in
    AutoAttack (its resc_schedule=False), or stretched to `queries` with rescale=True as in the Square paper's
    code (what matters below 10,000 queries: at 5,000 on 32x32 images, the last squares are 3 pixels wide or
    1). As in AutoAttack, a square's corner is drawn in [0, H - s) x [0, W - s), so it never covers the last row
    or column unless it spans the image, and an update that would leave the point unchanged is queried anyway.
    Only the images classified correctly are attacked, and only those not yet fooled (margin > 0, AutoAttack's
    test: a tie counts as fooled) are queried again.
    `queries` is the number of updates after the clean evaluation and the stripes (AutoAttack's n_queries), so
    an image never fooled costs queries + 2 model evaluations (5,002 at 5,000). Returns x where the clean input
    is misclassified, else the lowest-margin point of the search. Randomness from a generator seeded by `seed`:
    reproducible per seed.
    """
    x = check_batch(x, y)
    eps = _check_number("eps", eps)
    _check_count("queries", queries)
    if not 0 < float(p_init) <= 1:  # written so that NaN fails too
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if eps == 0:  # the ball is one point: nothing to search, no query to spend
        return x.clone()
    c, h, w = x.shape[1:]
    view, device = (-1, 1, 1, 1), x.device
    generator = torch.Generator(device=device).manual_seed(seed)

    def signs(*shape):  # random +-1 of x's dtype
        return torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1

    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)  # (H,), (W,)
    with torch.no_grad():  # scores only: no graph, no .grad anywhere
        logits = model(x).float()  # (N, K) query 1
        margin, best = _margin(logits, y), x.clone()  # (N,), (N, C, H, W)
        todo = (logits.argmax(1) == y).nonzero().squeeze(1)  # (M,) clean mistakes are never queried again
        if todo.numel():
            # query 2: the stripes, one sign per (image, channel, column), taken whatever their margin
            stripes = _project(x[todo] + eps * signs(len(todo), c, 1, w), x[todo], eps)  # (M, C, H, W)
            best[todo], margin[todo] = stripes, _margin(model(stripes).float(), y[todo])
        for it in range(queries):
            todo = (margin > 0).nonzero().squeeze(1)  # (M,) the images not fooled yet
            if todo.numel() == 0:
                break
            m, x_m, best_m = len(todo), x[todo], best[todo]  # (M, C, H, W) each
            s = min(max(round(math.sqrt(_square_p(it, queries, p_init, rescale) * h * w)), 1), h, w)
            # AutoAttack's corner is floor((H - s) * U[0, 1)), never H - s: the last row and column stay out of reach
            top = torch.randint(0, max(h - s, 1), (m, 1), generator=generator, device=device)  # (M, 1) corner row
            left = torch.randint(0, max(w - s, 1), (m, 1), generator=generator, device=device)  # (M, 1) corner col
            in_rows, in_cols = (rows >= top) & (rows < top + s), (cols >= left) & (cols < left + s)  # (M, H), (M, W)
            window = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (M, 1, H, W)
            # adding +-2 eps to the perturbation and projecting sets the window to x +- eps: computed directly,
            # bit-identical to the stripes. Where the window holds these signs already the candidate is the
            # current point; AutoAttack spends the query all the same, and so does this
            cand = torch.where(window, _project(x_m + eps * signs(m, c, 1, 1), x_m, eps), best_m)  # (M, C, H, W)
            new_margin = _margin(model(cand).float(), y[todo])  # (M,)
            better = new_margin < margin[todo]  # (M,) keep a candidate only where it lowers the margin
            best[todo] = torch.where(better.view(view), cand, best_m)
            margin[todo] = torch.where(better, new_margin, margin[todo])
    return best
