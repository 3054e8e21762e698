"""eval.py's diagnostics on an input stored sorted by class (as the JPEG copy's test set is): the representation
report and the sanity checks look at every class, not at the first images."""
import math

import torch

import eval as eval_cli


class NoisyOnOneClass(torch.nn.Module):
    """The fixture model, except that its outputs carry fresh noise on the images of one class (recognized by
    their exact pixels): a flaw that a check of the first images of a class-sorted input never sees."""

    def __init__(self, model, images):
        super().__init__()
        self.model, self.images = model, images.flatten(1)

    def forward(self, x):
        logits = self.model(x)
        flaky = (x.flatten(1)[:, None, :] == self.images[None]).all(2).any(1)  # (N,) one of those images
        return logits + flaky[:, None] * torch.randn_like(logits)

    def features(self, x):
        return self.model.features(x)


def test_diagnostics_see_every_class_of_a_class_sorted_input(trained_model, monkeypatch):
    model, x, y = trained_model
    order = y.argsort(stable=True)
    x, y = x[order], y[order]  # sorted by class: the first 16 images hold two or three classes
    last = int(y.max())
    flaky = NoisyOnOneClass(model, x[y == last]).eval()
    result = eval_cli.robustness(flaky, x, y, attacks="clean", batch_size=16, progress=False)
    assert any("differ between two identical calls" in w for w in result["warnings"])  # class `last` was checked
    assert y[eval_cli.spread(len(x), 16, x.device)][[0, -1]].tolist() == [0, last]  # from the first to the last

    # 250 images of each class in class order: the first 250 (the report's sample size) are all one class
    big = torch.cat([x[y == k][torch.arange(250) % int((y == k).sum())] for k in y.unique()])
    big_y = torch.cat([y[y == k][:1].repeat(250) for k in y.unique()])
    monkeypatch.setattr(eval_cli, "pgd", lambda model, x, *args: x)  # which images, not their attack, is tested here
    rep = eval_cli.robustness(model, big, big_y, attacks="clean", progress=False)["representation"]
    assert math.isfinite(rep["inter_class_cos"]) and math.isfinite(rep["intra_class_cos"])
    spread = eval_cli.spread(10000, 250, x.device)  # the CLI's default --n on a test set of 1000 per class
    assert torch.bincount(spread // 1000).tolist() == [25] * 10 and len(set(spread.tolist())) == 250


def test_an_input_of_one_class_is_warned_about(trained_model, capsys):
    """One class (the first images of a class-sorted test set): the per-class report names it weakest and
    strongest alike, so a warning, printed and in the result, says those figures mean nothing. Two classes: none."""
    model, x, y = trained_model
    k, other = int(y[0]), int(y[y != y[0]][0])
    one, two = y == k, (y == k) | (y == other)
    result = eval_cli.robustness(model, x[one], y[one], attacks="clean", batch_size=16)
    assert [c for c, a in enumerate(result["per_class"]["worst"]) if not math.isnan(a)] == [k]  # weakest = strongest
    [warning] = [w for w in result["warnings"] if "class" in w]
    assert warning.startswith(f"every image is of class {k}:") and "spread over the classes" in warning
    assert f"warning: {warning}" in capsys.readouterr().out
    result = eval_cli.robustness(model, x[two], y[two], attacks="clean", batch_size=16, progress=False)
    assert not any("every image" in w for w in result["warnings"])


def test_docs_snippet_runs_as_written(trained_model, tmp_path, monkeypatch, capsys):
    """docs/usage.md's "Evaluate your own model" block, run as written (CPU, data in ./data) with the fixture's
    model for `model = ...`: no .cuda(), a subset spread over the classes, every class present."""
    import os
    from test_data import make_cifar
    here = os.path.dirname(os.path.abspath(__file__))
    text = open(os.path.join(here, "docs", "usage.md")).read().split("## Evaluate your own model")[1]
    code = text.split("```python\n")[1].split("```")[0]
    assert code.count("model = ...") == 1 and ".cuda()" not in code
    make_cifar(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code.replace("model = ...", "model = fixture"), {"fixture": trained_model[0]}, scope)
    report = scope["report"]
    assert set(report["accuracy"]) >= {"clean", "pgd20", "autoattack", "worst"}
    assert len(scope["y"].unique()) > 1 and not any("every image" in w for w in report["warnings"])
    assert "{" in capsys.readouterr().out  # the prints ran
