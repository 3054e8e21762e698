"""Shared pytest fixtures.

`trained_model`: a small CIFAR ResNet-18 (width 8) trained for ~2 s on CPU on a synthetic 10-class image set
(oriented gratings under noise, 16x16, which the network accepts as it pools adaptively). It reaches ~100% clean
accuracy and, being trained without attacks, is not robust: PGD-20 leaves about 77%, 14% and 0% at eps = 2, 4
and 8/255, FGSM about 88%, 41% and 8%, so attacks of different strength give different accuracies there.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from model import build_model

# The tests' tensors are tiny, so a second intra-op thread gains little, and on a machine whose cores are busy
# with other work OpenMP's threads wait for each other at every op: eval's sanity checks on 40 images took 80 s
# with 2 threads and 0.9 s with 1 under load (measured). Subprocesses get OMP_NUM_THREADS=1 for the same reason.
torch.set_num_threads(1)


def synthetic_images(n, generator, size=16, amplitude=0.05, noise=0.08, classes=10):
    """(x float [n, 3, size, size] in [0, 1], y int64 [n] in [0, classes), classes <= 10): class k is a grating of
    orientation k % 5 and frequency 1.5 or 3 cycles per image (k < 5 or not), random phase, on gray, plus noise."""
    y = torch.randint(0, classes, (n,), generator=generator)
    theta = (y % 5).float() * math.pi / 5  # (n,)
    freq = torch.where(y < 5, 1.5, 3.0) * 2 * math.pi / size  # (n,) radians per pixel
    phase = torch.rand(n, generator=generator) * 2 * math.pi  # (n,)
    r = torch.arange(size).float()
    rows, cols = torch.meshgrid(r, r, indexing="ij")  # (size, size)
    along = theta.cos()[:, None, None] * cols + theta.sin()[:, None, None] * rows  # (n, size, size)
    wave = torch.cos(freq[:, None, None] * along + phase[:, None, None])  # (n, size, size)
    x = 0.5 + amplitude * wave[:, None] + noise * torch.randn(n, 3, size, size, generator=generator)
    return x.clamp(0, 1), y


@pytest.fixture(scope="session")
def trained_model():
    """(model in eval mode, x_test [64, 3, 16, 16], y_test [64]), trained once per session."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = synthetic_images(2048 + 64, generator)
    x_train, y_train, x_test, y_test = x[:2048], y[:2048], x[2048:], y[2048:]
    model = build_model({"width": 8})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for _ in range(100):
        idx = torch.randint(0, len(x_train), (64,), generator=generator)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)  # the tests check that attacks leave .grad at None
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.8, f"the fixture model did not learn the synthetic task: clean accuracy {accuracy:.2f}"
    return model, x_test, y_test
