"""CIFAR ResNet-18 with a projection head and a linear classifier.

    from model import build_model
    model = build_model({"width": 64})      # the ResNet-18 of the papers; width=16 for quick CPU runs
    logits = model(x)                        # x: float [N, 3, 32, 32] in [0, 1]
    logits, z = model(x, projection=True)    # z: [N, 128] projection (not normalized), one backbone pass

`model(x)` returns logits only, so the model plugs into attacks.py and into torchattacks, AutoAttack and
RobustBench unchanged. Normalization by the CIFAR-10 mean/std is the model's first step: every attack works
in [0, 1] pixel space. The config is a plain dict (saved in checkpoints), so `build_model(ckpt["config"]["model"])`
rebuilds the network.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULTS = {"arch": "resnet18", "width": 64, "num_classes": 10, "proj_dim": 128}


class BasicBlock(nn.Module):
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


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, stages of width w, 2w, 4w, 8w."""

    def __init__(self, width=64, num_classes=10, proj_dim=128, arch="resnet18"):
        super().__init__()
        self.config = {"arch": arch, "width": width, "num_classes": num_classes, "proj_dim": proj_dim}
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.feature_dim = c_in
        # The SupCon projection head: the contrastive loss acts on z, the classifier on the backbone features.
        self.head = nn.Sequential(nn.Linear(c_in, c_in), nn.ReLU(inplace=True), nn.Linear(c_in, proj_dim))
        self.classifier = nn.Linear(c_in, num_classes)

    def features(self, x):
        """[N, 3, H, W] in [0, 1] -> pooled backbone features [N, 8w]."""
        x = (x - self.mean) / self.std
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)  # (N, 8w, H/8, W/8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 8w)

    def forward(self, x, projection=False):
        """Logits [N, classes]; with projection=True, (logits, projection [N, proj_dim]) from one backbone pass.
        The flag (rather than a second method only) lets torch.compile(model) cover the training pass too."""
        h = self.features(x)
        return (self.classifier(h), self.head(h)) if projection else self.classifier(h)

    def forward_train(self, x):
        """(logits, projection) from one pass of the backbone: the training forward."""
        return self(x, projection=True)

    def backbone_parameters(self):
        """Everything but the classifier: what `--finetune-epochs` freezes."""
        return [p for name, p in self.named_parameters() if not name.startswith("classifier.")]


def build_model(config=None):
    """Build the network from a plain dict such as {"width": 16}; missing keys take DEFAULTS."""
    config = dict(config or {})
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"model config: unknown keys {sorted(unknown)}; known keys are {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **config}
    if config["arch"] != "resnet18":
        raise ValueError(f"model config: arch {config['arch']!r} is not supported; use 'resnet18'")
    for key in ("width", "num_classes", "proj_dim"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ValueError(f"model config: {key} must be a positive int, got {config[key]!r}")
    return ResNet18(**config)
