"""Tests of the networks (model.py): python -m pytest -q test_model.py"""
import math

import pytest
import torch
import torch.nn.functional as F

from model import PreActBlock, build_model

# backbone + linear classifier (the projection head excluded), 10 classes: the published figures.
PUBLISHED = {"resnet18": 11_173_962, "preact-resnet18": 11_172_170, "wrn-34-10": 46_160_474, "wrn-28-10": 36_479_194}
# Small members of each family for the contract tests: wrn-16-1 has an identity first block, wrn-10-2 a 1x1 one.
SMALL = [{"arch": "resnet18", "width": 4}, {"arch": "preact-resnet18", "width": 4},
         {"arch": "wrn-16-1"}, {"arch": "wrn-10-2"}]
ids = [c["arch"] for c in SMALL]


def count(model):
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("head."))


@pytest.mark.parametrize("arch", PUBLISHED)
def test_parameter_count_is_the_published_one(arch):
    with torch.device("meta"):  # shapes only: no memory, no initialization cost
        model = build_model({"arch": arch})
    assert count(model) == PUBLISHED[arch]


@pytest.mark.parametrize("arch, d", [("resnet18", 512), ("wrn-34-10", 640)])
def test_hundred_classes_change_only_the_classifier(arch, d):
    with torch.device("meta"):
        ten, hundred = build_model({"arch": arch}), build_model({"arch": arch, "num_classes": 100})
    assert count(hundred) - count(ten) == 90 * d + 90  # 90 more rows of weights and biases
    assert ten.feature_dim == hundred.feature_dim == d
    assert sum(p.numel() for p in hundred.head.parameters()) == sum(p.numel() for p in ten.head.parameters())


def resnet18_keys():
    """The state_dict keys, in order, of model.py's ResNet-18 before the other archs came (earlier checkpoints)."""
    def bn(p):
        return [f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys = ["mean", "std", "conv1.weight"] + bn("bn1")
    for s in range(4):
        for b in range(2):
            p = f"stages.{s}.{b}"
            keys += [f"{p}.conv1.weight"] + bn(f"{p}.bn1") + [f"{p}.conv2.weight"] + bn(f"{p}.bn2")
            if s > 0 and b == 0:
                keys += [f"{p}.shortcut.0.weight"] + bn(f"{p}.shortcut.1")
    return keys + ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "classifier.weight",
                   "classifier.bias"]


def test_resnet18_keys_and_parameter_order_are_unchanged():
    model = build_model({"width": 4})
    assert len(resnet18_keys()) == 128
    assert list(model.state_dict()) == resnet18_keys()  # old checkpoints load strictly
    # optimizer states index parameters by position: the order must hold too
    names = [n for n, _ in model.named_parameters()]
    assert names == [k for k in resnet18_keys() if k in set(names)]
    assert model.config == {"arch": "resnet18", "width": 4, "num_classes": 10, "proj_dim": 128,
                            "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}


@pytest.mark.parametrize("config", SMALL, ids=ids)
def test_logits_and_projection_from_one_backbone_pass(config):
    model = build_model(config).eval()
    x = torch.rand(2, 3, 16, 16)
    calls = []
    first, last = (getattr(model, name) for name in (model.layers[0], model.layers[-1]))
    for layer in (first, last):
        layer.register_forward_hook(lambda *_: calls.append(1))
    logits, z = model(x, projection=True)
    assert len(calls) == 2  # the first and the last backbone layer ran once each
    assert logits.shape == (2, 10) and z.shape == (2, 128)
    out = model(x)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, logits, atol=1e-6)  # logits only
    h = model.features(x)
    assert h.shape == (2, model.feature_dim) and (h >= 0).all()  # pooled after a final ReLU, in every arch
    assert torch.allclose(model.head(h), z, atol=1e-6) and torch.allclose(model.classifier(h), logits, atol=1e-6)


@pytest.mark.parametrize("c_in, c_out, stride", [(4, 4, 1), (4, 8, 1), (4, 8, 2)])
def test_preact_block_is_the_reference_one(c_in, c_out, stride):
    """BN-ReLU-conv twice; a 1x1 shortcut conv (no BN) on the pre-activated input, else the raw input."""
    torch.manual_seed(0)
    block = PreActBlock(c_in, c_out, stride).eval()
    for bn in (block.bn1, block.bn2):  # non-trivial statistics, so that a skipped BN shows
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, c_in, 8, 8)
    bn = lambda m, t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias)
    a = F.relu(bn(block.bn1, x))
    out = F.conv2d(F.relu(bn(block.bn2, F.conv2d(a, block.conv1.weight, stride=stride, padding=1))),
                   block.conv2.weight, padding=1)
    shortcut = x if c_in == c_out and stride == 1 else F.conv2d(a, block.shortcut.weight, stride=stride)
    assert (block.shortcut is None) == (c_in == c_out and stride == 1)
    assert torch.allclose(block(x), out + shortcut, atol=1e-5)


@pytest.mark.parametrize("config", SMALL, ids=ids)
def test_rebuilds_from_its_config_through_a_checkpoint(config, tmp_path):
    model = build_model({**config, "num_classes": 5, "proj_dim": 16}).eval()
    torch.save({"model": model.state_dict(), "config": {"model": model.config}}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the config is plain types
    clone = build_model(ckpt["config"]["model"]).eval()
    clone.load_state_dict(ckpt["model"])  # strict
    assert clone.config == model.config
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("config", SMALL, ids=ids)
def test_normalization_from_the_config_is_inside(config):
    model = build_model(config).eval()
    mean, std = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]  # CIFAR-100's
    other = build_model({**config, "mean": mean, "std": std}).eval()
    weights = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    other.load_state_dict(weights, strict=False)
    x = torch.rand(2, 3, 16, 16)
    assert not torch.allclose(other(x), model(x), atol=1e-4)
    # the same weights, so other(x) is model(x') for the x' that model normalizes to what other sees
    m0, s0 = model.mean, model.std
    m1, s1 = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(other(x), model((x - m1) / s1 * s0 + m0), atol=1e-4)


@pytest.mark.parametrize("config", SMALL, ids=ids)
def test_a_training_step_moves_backbone_head_and_classifier(config):
    torch.manual_seed(0)
    model = build_model(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = next(getattr(model, model.layers[0]).parameters())
    before = {"backbone": first.detach().clone(), "head": model.head[0].weight.detach().clone(),
              "classifier": model.classifier.weight.detach().clone()}
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, z = model(x, projection=True)
    loss = F.cross_entropy(logits, y) + F.normalize(z, dim=1)[:, 0].sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    after = {"backbone": first, "head": model.head[0].weight, "classifier": model.classifier.weight}
    for name in before:
        assert not torch.equal(before[name], after[name]), name


def test_defaults_for_older_configs_and_wrn_width():
    old = build_model({"arch": "resnet18", "width": 4, "num_classes": 10, "proj_dim": 128})  # no mean/std
    assert old.config["mean"] == [0.4914, 0.4822, 0.4465] and old.config["std"] == [0.2470, 0.2435, 0.2616]
    assert torch.allclose(old.std.flatten(), torch.tensor([0.2470, 0.2435, 0.2616]))
    given = build_model({"width": 4, "mean": (0, 0.5, 1), "std": (1, 1, 2)}).config
    assert given["mean"] == [0.0, 0.5, 1.0] and all(type(c) is float for c in given["mean"] + given["std"])
    # a WRN's name gives its widths: width unset, the default 64 or None all build it, and it is stored as None
    for config in ({"arch": "wrn-10-1"}, {"arch": "wrn-10-1", "width": 64}, {"arch": "wrn-10-1", "width": None}):
        assert build_model(config).config["width"] is None


@pytest.mark.parametrize("config, key", [
    ({"arch": "vgg"}, "arch"), ({"arch": "wrn-35-10"}, "arch"), ({"arch": "wrn-4-10"}, "arch"),
    ({"arch": "wrn-34-0"}, "arch"), ({"arch": 18}, "arch"), ({"arch": ["resnet18"]}, "arch"),
    ({"arch": "wrn-D-K"}, "arch"), ({"depth": 18}, "depth"),
    ({"width": 0}, "width"), ({"width": 2.5}, "width"), ({"width": True}, "width"), ({"width": None}, "width"),
    ({"arch": "wrn-34-10", "width": 16}, "width"), ({"num_classes": 0}, "num_classes"), ({"proj_dim": 1.0}, "proj_dim"),
    ({"mean": [0.5, 0.5]}, "mean"), ({"mean": "0.5"}, "mean"), ({"mean": torch.zeros(3)}, "mean"),
    ({"mean": [0.5, math.inf, 0.5]}, "mean"), ({"std": [0.2, 0.0, 0.2]}, "std"), ({"std": [0.2, math.nan, 0.2]}, "std"),
    ({"std": [0.2, -1, 0.2]}, "std")])
def test_bad_config_raises_naming_the_key(config, key):
    with pytest.raises(ValueError, match=f"model config: .*{key}") as e:
        build_model(config)
    if key == "arch" and "vgg" in str(config):  # the unknown-arch message lists what exists
        assert all(a in str(e.value) for a in ("resnet18", "preact-resnet18", "wrn-D-K", "wrn-34-10"))
