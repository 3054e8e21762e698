"""The CIFAR networks of the adversarial-training literature, each with a projection head and a linear classifier.

    from model import build_model
    model = build_model({"arch": "wrn-34-10"})   # or "resnet18" (default), "preact-resnet18", any "wrn-D-K"
    logits = model(x)                            # x: float [N, 3, H, W] in [0, 1]
    logits, z = model(x, projection=True)        # z: [N, 128] projection (not normalized), one backbone pass

arch             parameters (backbone + classifier, 10 classes; the head excluded)   as in
resnet18         11,173,962 at width 64        kuangliu/pytorch-cifar; post-activation, BN on the 1x1 shortcut
preact-resnet18  11,172,170 at width 64        Wong et al. 2020 (fast_adversarial), Rice et al. 2020
wrn-34-10        46,160,474                    TRADES, AWP, RobustBench: BN-ReLU-conv blocks, 1x1 shortcut no BN
wrn-28-10        36,479,194                    the same definition; wrn-D-K for any depth D = 6n+4, widen factor K
100 classes add 90 weights per feature (512 for the ResNets, 640 for WRN-*-10) plus 90 biases.

The config is a plain dict saved in checkpoints, so `build_model(ckpt["config"]["model"])` rebuilds the network:
arch; width (the ResNets' base width: 64 is the papers', 16 or 8 for quick CPU runs; a WRN's name carries its
widths, so for WRN width must be left at the default 64 or None, and is stored as None); num_classes; proj_dim;
mean and std (3 floats each: the data set's normalization, CIFAR-10's by default and for older checkpoints).
`model(x)` returns logits only, so the model plugs into attacks.py and into torchattacks, AutoAttack and
RobustBench unchanged. Normalization is the model's first step: every attack works in [0, 1] pixel space.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
DEFAULTS = {"arch": "resnet18", "width": 64, "num_classes": 10, "proj_dim": 128, "mean": CIFAR10_MEAN,
            "std": CIFAR10_STD}


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add, ReLU (He et al. 2016); BN on the 1x1 projection shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv, BN-ReLU-conv, add (He et al. 2016b): the block of PreAct ResNet and of the WideResNets.
    Where the shape changes, the 1x1 shortcut (no BN) takes the pre-activated input; the identity, the raw one."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


def make_stages(block, c_in, widths, depth):
    """One stage per width, `depth` blocks each; every stage after the first halves the resolution."""
    stages = []
    for i, c_out in enumerate(widths):
        blocks = [block(c_in if j == 0 else c_out, c_out, 2 if i > 0 and j == 0 else 1) for j in range(depth)]
        stages.append(nn.Sequential(*blocks))
        c_in = c_out
    return nn.Sequential(*stages)


# A backbone is an ordered dict of named layers, applied in turn, and the width of its output.
def resnet18(arch, width):
    """CIFAR ResNet-18: 3x3 stem, no max-pool, stages of width w, 2w, 4w, 8w."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return {"conv1": nn.Conv2d(3, width, 3, 1, 1, bias=False), "bn1": nn.BatchNorm2d(width), "relu": nn.ReLU(),
            "stages": make_stages(BasicBlock, width, widths, 2)}, widths[-1]


def preact_resnet18(arch, width):
    """PreAct ResNet-18: plain 3x3 stem, pre-activation stages of width w..8w, then the final BN-ReLU."""
    widths = [width, 2 * width, 4 * width, 8 * width]
    return {"conv1": nn.Conv2d(3, width, 3, 1, 1, bias=False), "stages": make_stages(PreActBlock, width, widths, 2),
            "bn": nn.BatchNorm2d(widths[-1]), "relu": nn.ReLU()}, widths[-1]


def wide_resnet(arch, width):
    """WRN-D-K (Zagoruyko & Komodakis 2016): 16-channel stem, three stages of (D-4)/6 blocks of width 16K, 32K, 64K."""
    depth, k = (int(s) for s in re.fullmatch(r"wrn-(\d+)-(\d+)", arch).groups())
    widths = [16 * k, 32 * k, 64 * k]
    stages = make_stages(PreActBlock, 16, widths, (depth - 4) // 6)
    layers = {"conv1": nn.Conv2d(3, 16, 3, 1, 1, bias=False), "stages": stages, "bn": nn.BatchNorm2d(widths[-1]),
              "relu": nn.ReLU()}
    for m in nn.ModuleDict(layers).modules():  # the reference's initialization: He normal, fan-out
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return layers, widths[-1]


ARCHS = {"resnet18": resnet18, "preact-resnet18": preact_resnet18, "wrn-D-K": wide_resnet}


def arch_key(arch):
    """The ARCHS key of an arch name; ValueError naming the known ones."""
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", arch) if isinstance(arch, str) else None
    if m:
        depth, k = int(m[1]), int(m[2])
        if depth < 10 or (depth - 4) % 6 or k < 1:
            raise ValueError(f"model config: arch {arch!r}: a WideResNet wrn-D-K needs depth D = 6n+4 >= 10 "
                             f"(16, 22, 28, 34, ...) and widen factor K >= 1")
        return "wrn-D-K"
    if not isinstance(arch, str) or arch not in ARCHS or arch == "wrn-D-K":
        raise ValueError(f"model config: arch {arch!r} is not supported; use one of {sorted(ARCHS)} "
                         f"(wrn-D-K: e.g. 'wrn-34-10', 'wrn-28-10')")
    return arch


class Network(nn.Module):
    """What every arch shares: normalization, the backbone's layers, the projection head, the linear classifier."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1))
        layers, self.feature_dim = ARCHS[arch_key(config["arch"])](config["arch"], config["width"])
        # The backbone's layers are attributes of the model itself (conv1.*, stages.*, not backbone.conv1.*), so
        # resnet18's state_dict keys and parameter order are those of earlier checkpoints and optimizer states.
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.layers = list(layers)
        d = self.feature_dim
        # The SupCon projection head: the contrastive loss acts on z, the classifier on the backbone features.
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, config["proj_dim"]))
        self.classifier = nn.Linear(d, config["num_classes"])

    def features(self, x):
        """[N, 3, H, W] in [0, 1] -> pooled backbone features [N, d]."""
        x = (x - self.mean) / self.std
        for name in self.layers:
            x = getattr(self, name)(x)  # (N, d, H/8, W/8) after the last stage (H/4 for WRN)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, d)

    def forward(self, x, projection=False):
        """Logits [N, classes]; with projection=True, (logits, projection [N, proj_dim]) from one backbone pass.
        The flag (rather than a second method only) lets torch.compile(model) cover the training pass too."""
        h = self.features(x)
        return (self.classifier(h), self.head(h)) if projection else self.classifier(h)


def build_model(config=None):
    """Build the network from a plain dict such as {"arch": "preact-resnet18"}; missing keys take DEFAULTS."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"model config: unknown keys {sorted(unknown)}; known keys are {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **config}
    is_wrn = arch_key(config["arch"]) == "wrn-D-K"
    if is_wrn:  # the name carries the widths: accept only "not set" (the default or None), reject a contradiction
        if config["width"] not in (None, DEFAULTS["width"]):
            raise ValueError(f"model config: width {config['width']!r} does not apply to {config['arch']!r}, whose "
                             f"name gives its widths; leave width unset (or None)")
        config["width"] = None
    for key in ("num_classes", "proj_dim") + (() if is_wrn else ("width",)):
        if type(config[key]) is not int or config[key] < 1:  # type(), not isinstance: True is no width
            raise ValueError(f"model config: {key} must be a positive int, got {config[key]!r}")
    for key in ("mean", "std"):
        v = config[key]
        numbers = isinstance(v, (list, tuple)) and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                        for c in v)
        if not (numbers and len(v) == 3 and all(map(math.isfinite, v))):
            raise ValueError(f"model config: {key} must be a list of 3 finite floats, got {v!r}")
        if key == "std" and min(v) <= 0:
            raise ValueError(f"model config: std must be > 0, got {v!r}")
        config[key] = [float(c) for c in v]  # plain lists, so checkpoints load with weights_only=True
    return Network(config)
