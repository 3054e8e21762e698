"""Tests of the ANCHOR loss (anchor.py) and the network (model.py): python -m pytest -q"""
import math

import pytest
import torch
import torch.nn.functional as F

from anchor import anchor_loss, feature_cosines, loss_diagnostics
from model import build_model


def slow_anchor_loss(features, labels, temperature, beta):
    """The loss as the issue writes it, one anchor at a time, in float64."""
    B, V, D = features.shape
    z = [F.normalize(features[b, v].double(), dim=0) for b in range(B) for v in range(V)]
    y = [int(labels[b]) for b in range(B) for v in range(V)]
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(len(z)) if a != i)
        w = [math.exp(beta * (1 - float(z[i] @ z[p]))) for p in positives]
        w = [wp / (sum(w) / len(w)) for wp in w]  # weights averaging 1
        terms = [wp * (float(z[i] @ z[p]) / temperature - math.log(denom)) for wp, p in zip(w, positives)]
        losses.append(-sum(terms) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def supcon_khosla(features, labels, temperature):
    """SupCon L_out in the mask form of Khosla et al.'s losses.py, written anew (base_temperature = temperature)."""
    B, V, _ = features.shape
    f = F.normalize(features, dim=2)
    contrast = torch.cat(torch.unbind(f, dim=1), dim=0)  # (V*B, D), view-major order, unlike anchor.py
    mask = torch.eq(labels[:, None], labels[None, :]).float().repeat(V, V)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1 - torch.eye(B * V)
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return -mean_log_prob_pos.mean()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_matches_slow_reference(seed, beta):
    g = torch.Generator().manual_seed(seed)
    B, V, D = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)), 7
    feats = torch.randn(B, V, D, generator=g) * 3
    labels = torch.randint(0, 4, (B,), generator=g)
    t = [0.05, 0.1, 0.5][seed % 3]
    got = anchor_loss(feats, labels, temperature=t, beta=beta)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(slow_anchor_loss(feats, labels, t, beta), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_beta_zero_is_supcon(seed):
    g = torch.Generator().manual_seed(seed)
    feats, labels = torch.randn(16, 2, 32, generator=g), torch.randint(0, 3, (16,), generator=g)
    for t in (0.07, 0.1, 0.5):
        ref = supcon_khosla(feats, labels, t)
        assert torch.allclose(anchor_loss(feats, labels, t, beta=0.0), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_loss_grows_with_beta(seed):
    # log p(p | i) rises with z_i.z_p, and beta tilts the weights toward the least similar positives,
    # so every anchor's loss, and the mean, is non-decreasing in beta.
    g = torch.Generator().manual_seed(seed)
    feats, labels = torch.randn(10, 2, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    losses = [anchor_loss(feats, labels, 0.2, beta).item() for beta in (0.0, 0.5, 1.0, 2.0, 5.0, 20.0)]
    assert all(a <= b + 1e-6 for a, b in zip(losses, losses[1:])) and losses[-1] > losses[0] + 1e-3


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    assert anchor_loss(feats, labels, 0.3, 1.0).dtype == torch.float64
    # beta = 0: finite differences see no weights; beta > 0 is the stop-gradient test below.
    assert torch.autograd.gradcheck(lambda f: anchor_loss(f, labels, 0.3, 0.0), (feats,))


def test_weights_carry_no_gradient():
    """The gradient is that of the loss with the hard-positive weights held as constants."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    beta, t = 3.0, 0.2
    (grad,) = torch.autograd.grad(anchor_loss(feats, labels, t, beta), feats)

    def loss_with(weights_from):  # the same formula, with the weights computed from `weights_from`
        z = F.normalize(feats.reshape(12, 5), dim=1)
        zw = F.normalize(weights_from.reshape(12, 5), dim=1)
        y = labels.repeat_interleave(2)
        eye = torch.eye(12, dtype=torch.bool)
        pos = (y[:, None] == y[None]) & ~eye
        w = torch.exp(beta * (1 - zw @ zw.T)) * pos
        q = w / w.sum(1, keepdim=True)
        logits = z @ z.T / t
        log_prob = logits - logits.masked_fill(eye, -math.inf).logsumexp(1, keepdim=True)
        return -(q * log_prob.masked_fill(~pos, 0)).sum(1).mean()

    (grad_const,) = torch.autograd.grad(loss_with(feats.detach()), feats)
    (grad_through,) = torch.autograd.grad(loss_with(feats), feats)
    assert torch.allclose(grad, grad_const, atol=1e-10)
    assert not torch.allclose(grad, grad_through, atol=1e-4)  # the check can tell the two apart


@pytest.mark.parametrize("B,V,n_classes", [(1, 1, 1), (1, 2, 1), (1, 3, 1), (8, 2, 1), (6, 1, 6), (9, 2, 9)])
def test_edge_cases_finite_with_graph(B, V, n_classes):
    feats = torch.randn(B, V, 16, requires_grad=True)
    labels = torch.arange(B) % n_classes
    loss = anchor_loss(feats, labels, temperature=0.01, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()
    if V == 1 and n_classes == B:  # no anchor has a positive
        assert loss.item() == 0.0


def test_extreme_inputs_stay_finite():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 1, 2])
    cases = [torch.randn(5, 2, 8, generator=g) * 1e30, torch.randn(5, 2, 8, generator=g) * 1e-30,
             torch.ones(5, 2, 8), torch.randn(1, 2, 8, generator=g).repeat(5, 1, 1)]
    for feats in cases:
        for t, beta in ((0.01, 0.0), (0.01, 50.0), (1.0, 200.0)):
            f = feats.clone().requires_grad_(True)
            loss = anchor_loss(f, labels, t, beta)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(f.grad).all(), (t, beta)


def test_low_precision_inputs_under_autocast():
    g = torch.Generator().manual_seed(3)
    feats, labels = torch.randn(12, 2, 16, generator=g), torch.randint(0, 3, (12,), generator=g)
    ref = anchor_loss(feats, labels, 0.05, 1.0)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = anchor_loss(feats.to(dtype), labels, 0.05, 1.0)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=0.05)  # only the input rounding differs


@pytest.mark.parametrize("kwargs,name", [
    (dict(features=torch.randn(4, 8)), "features"),
    (dict(features=torch.randint(0, 3, (4, 2, 8))), "features"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.long)), "labels"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(beta=-1.0), "beta"),
])
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(features=torch.randn(4, 2, 8), labels=torch.zeros(4, dtype=torch.long), temperature=0.1, beta=1.0)
    with pytest.raises(ValueError, match=name):
        anchor_loss(**{**args, **kwargs})


# ---- model.py ----

def test_model_returns_logits_and_projection():
    model = build_model({"width": 8}).eval()
    x = torch.rand(3, 3, 32, 32)
    logits, z = model(x, projection=True)
    assert logits.shape == (3, 10) and z.shape == (3, 128)
    assert torch.equal(model(x), logits)  # model(x) is logits only, from the same backbone pass
    assert model.feature_dim == 64


def test_model_normalizes_inside():
    model = build_model({"width": 8}).eval()
    x = torch.rand(2, 3, 32, 32)
    mean, std = model.mean, model.std
    manual = model.classifier(F.adaptive_avg_pool2d(
        model.stages(F.relu(model.bn1(model.conv1((x - mean) / std)))), 1).flatten(1))
    assert torch.allclose(model(x), manual, atol=1e-6)
    assert mean.shape == (1, 3, 1, 1) and "mean" in model.state_dict()


def test_model_rebuilds_from_its_config():
    model = build_model({"width": 8, "num_classes": 5})
    clone = build_model(model.config)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), clone.eval()(x))


@pytest.mark.parametrize("config", [{"depth": 18}, {"width": 0}, {"width": 2.5}, {"arch": "vgg"}])
def test_model_bad_config(config):
    with pytest.raises(ValueError, match="model config"):
        build_model(config)


# ---------------------------------------------------------------- diagnostics


def test_loss_diagnostics_at_the_two_reference_points():
    """Every embedding equal: the loss is log(N - 1) (covered 0) and each positive weighs 1/|P(i)|. Each class
    collapsed to its own point, the points orthogonal: the loss tends to the mean of log|P(i)| (covered 1)."""
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])  # B = 7 images, N = 14 views; |P(i)| = 3, 3, 5 by class
    log_p = (8 * math.log(3) + 6 * math.log(5)) / 14
    d = loss_diagnostics(torch.ones(7, 2, 4), y, temperature=0.5, beta=1.0)
    assert d["loss"] == pytest.approx(math.log(13)) and d["uniform"] == pytest.approx(math.log(13))
    assert d["collapse"] == pytest.approx(log_p) and d["covered"] == pytest.approx(0, abs=1e-6)
    assert d["q_twin"] == pytest.approx(d["inv_positives"]) == pytest.approx((8 / 3 + 6 / 5) / 14)
    collapsed = torch.eye(4)[y][:, None].expand(7, 2, 4)  # class k at the unit vector e_k, both views
    d = loss_diagnostics(collapsed, y, temperature=0.02, beta=1.0)  # negatives weigh exp(-50): nothing
    assert d["loss"] == pytest.approx(log_p) and d["covered"] == pytest.approx(1, abs=1e-6)
    assert (d["head_twin"], d["head_intra"]) == pytest.approx((1, 1)) and d["head_inter"] == pytest.approx(0)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_twin_weight_equals_a_slow_count(beta):
    """q_twin against one anchor at a time: the weight w = exp(beta (1 - cos)) of the other view, normalized over
    the anchor's positives; beta 0 gives every positive 1/|P(i)|, the mean inv_positives."""
    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(6, 2, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 2])
    z = [F.normalize(f[b, v], dim=0) for b in range(6) for v in range(2)]
    labels = [int(y[i // 2]) for i in range(12)]
    twins, inverse = [], []
    for i in range(12):
        positives = [p for p in range(12) if p != i and labels[p] == labels[i]]
        w = {p: math.exp(beta * (1 - float(z[i] @ z[p]))) for p in positives}
        twins.append(w[i ^ 1] / sum(w.values()))
        inverse.append(1 / len(positives))
    d = loss_diagnostics(f, y, temperature=0.3, beta=beta)
    assert d["q_twin"] == pytest.approx(sum(twins) / 12) and d["inv_positives"] == pytest.approx(sum(inverse) / 12)
    assert (d["q_twin"] == pytest.approx(d["inv_positives"])) == (beta == 0)
    assert d["loss"] == pytest.approx(slow_anchor_loss(f, y, 0.3, beta))


def test_feature_cosines_by_hand():
    clean = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # classes 0, 0, 1; flattened and normalized inside
    adv = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    c = feature_cosines(clean, adv, torch.tensor([0, 0, 1]))
    assert c["twin"] == pytest.approx((math.sqrt(0.5) + 1 - 1) / 3)
    assert c["intra"] == pytest.approx(1.0) and c["inter"] == pytest.approx(0.0)
    assert math.isnan(feature_cosines(clean, adv, torch.tensor([0, 1, 2]))["intra"])  # no pair of one class
