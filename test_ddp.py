"""Several processes on the CPU (gloo): anchor_loss over the global batch under DDP, and train.py under torchrun.

    python -m pytest -q test_ddp.py
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import eval as eval_cli
import train
from anchor import anchor_loss
from test_cli import HERE, TINY, assert_user_error, run_here
from test_data import make_cifar

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(seed=0):
    """A batch of 6 images x 2 views for a tiny "network" (a linear map), float64. Rank 0 takes images 0..3 and
    rank 1 images 4..5 (uneven on purpose); label 7 appears once on each rank, so its only positives (apart
    from the other view) lie on the other rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 2, 5, generator=g, dtype=torch.float64)  # (B, V, 5) inputs of the linear map
    y = torch.tensor([7, 1, 2, 1, 7, 2])
    return x, y, [slice(0, 4), slice(4, 6)]


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 4, dtype=torch.float64)


BETAS = (0.0, 1.5)  # SupCon and hard-positive weighting


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y, parts = global_batch()
        for beta in BETAS:
            model = torch.nn.parallel.DistributedDataParallel(linear())
            local = parts[rank]
            loss = anchor_loss(model(x[local]), y[local], temperature=0.5, beta=beta, distributed=True)
            loss.backward()
            losses = [None] * WORLD
            dist.all_gather_object(losses, loss.item())
            grads = {k: p.grad.clone() for k, p in model.module.named_parameters()}
            results[rank, beta] = {"losses": losses, "grads": grads}
    finally:
        dist.destroy_process_group()


def test_distributed_loss_and_gradients_equal_one_process():
    """Under DDP (2 processes, uneven sub-batches, a positive pair across ranks) every rank returns the loss of the
    whole batch, and DDP's averaged gradients equal the gradients of one process on the concatenated batch."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD)
    x, y, _ = global_batch()
    for beta in BETAS:
        model = linear()
        expected = anchor_loss(model(x), y, temperature=0.5, beta=beta)
        expected.backward()
        for rank in range(WORLD):
            assert results[rank, beta]["losses"] == pytest.approx([expected.item()] * WORLD, rel=1e-12)
            for name, p in model.named_parameters():
                torch.testing.assert_close(results[rank, beta]["grads"][name], p.grad, rtol=1e-10, atol=1e-12)
        # The check can fail: the local sub-batch alone gives another loss (label 7 loses its cross-rank positive).
        assert anchor_loss(model(x[:4]), y[:4], temperature=0.5, beta=beta).item() != pytest.approx(expected.item())


def test_distributed_without_process_group_is_plain():
    x, y, _ = global_batch()
    z = linear()(x)
    assert torch.equal(anchor_loss(z, y, distributed=True), anchor_loss(z, y))


# ---------------------------------------------------------------- train.py under torchrun


def torchrun(*args, timeout=180):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def test_torchrun_user_error_is_one_line_from_rank_0(tmp_path):
    make_cifar(tmp_path)
    r = torchrun(os.path.join(HERE, "train.py"), "--data", tmp_path, "--out", tmp_path / "x.pt", *TINY,
                 "--batch-size", "33")
    worker_lines = [line for line in r.stderr.splitlines() if "train.py: error:" in line]
    assert r.returncode != 0 and len(worker_lines) == 1, r.stderr
    assert f'File "{HERE}' not in r.stderr, r.stderr  # no traceback of ours (torchrun prints its own report)
    assert "--batch-size 33" in worker_lines[0] and "multiple of 2" in worker_lines[0]
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("env, flags, words", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["--sync-bn"], ["--sync-bn", "cuda"]),  # as torchrun sets
    ({"RANK": "0"}, [], ["WORLD_SIZE", "torchrun"]),  # RANK alone: a half-set launcher, not a KeyError
])
def test_launch_errors_before_the_process_group(tmp_path, monkeypatch, capsys, env, flags, words):
    """The checks that run before any process group is joined, in this process with torchrun's variables set
    (the way their one line reaches the user under torchrun is the test above)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = run_here(train, "--data", tmp_path, "--out", tmp_path / "x.pt", *TINY, *flags, capsys=capsys)
    assert_user_error(r, *words)
    assert not (tmp_path / "x.pt").exists() and not dist.is_initialized()


def patched_train(path, patch):
    """A script that runs train.py's CLI with `patch` (Python source, run after `import train`) applied first:
    a way to make one rank misbehave under torchrun."""
    path.write_text(f"import os, signal, sys\nsys.path.insert(0, {HERE!r})\nimport train\n{patch}\n"
                    "train.cli(train.main, train.get_args, 'train.py')\n")
    return path


def test_torchrun_a_failing_rank_stops_all(tmp_path):
    """A rank that fails in set-up (here: its data cannot be read, in rank 1 only) stops every rank with one line
    from rank 0 naming that rank; no rank waits on a collective."""
    make_cifar(tmp_path)
    script = patched_train(tmp_path / "flaky.py", (
        "real = train.load_dataset\n"
        "def load(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise train.DataError('cannot read the data on this node')\n"
        "    return real(*a, **k)\n"
        "train.load_dataset = load"))
    r = torchrun(script, "--data", tmp_path, "--out", tmp_path / "x.pt", *TINY, timeout=120)
    lines = [line for line in r.stderr.splitlines() if "train.py: error:" in line]
    assert r.returncode != 0 and len(lines) == 1 and "rank 1: cannot read the data" in lines[0], r.stderr
    assert f'File "{HERE}' not in r.stderr, r.stderr  # no traceback of ours
    assert not (tmp_path / "x.pt").exists()


def test_torchrun_trains_stops_on_one_rank_signal_and_resumes_exactly(tmp_path, capsys):
    """2 processes: rank 0 alone prints and writes, eval.py reads the checkpoint on one device. A SIGTERM that
    reaches rank 1 alone, mid-epoch: every rank stops at the same step, the next (the ranks' votes are read a step
    late, so agreeing never waits on the device), and the state is saved once; --resume under torchrun then ends
    with the weights of the run never stopped. (torchrun with --compile, compiled DDP against eager DDP: .ci/gpu_check.sh,
    which CI runs on the CPU.)"""
    make_cifar(tmp_path)
    common = ["--data", tmp_path, "--epochs", "2", *TINY, "--limit", "48", "--batch-size", "16"]  # 3 steps an epoch
    r = torchrun(os.path.join(HERE, "train.py"), *common, "--out", tmp_path / "a.pt")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("val_pgd") == 1 and r.stdout.count("saved") == 1  # the table once: rank 0 prints
    assert "x 2 processes" in r.stdout
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    assert a["epoch"] == 2 and a["world_size"] == WORLD and len(a["rng"]) == WORLD
    assert not any(k.startswith("module.") for k in a["model"])  # the plain model's weights, not DDP's
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(0 <= row["val_pgd"] <= row["val_clean"] <= 1 for row in rows)
    assert rows[0]["val_clean"] * 20 == pytest.approx(round(rows[0]["val_clean"] * 20))  # counts over all 20 val images
    e = run_here(eval_cli, tmp_path / "a.pt", "--data", tmp_path, "--n", 10, "--attacks", "clean,pgd20",
                 "--device", "cpu", capsys=capsys)
    assert e.returncode == 0, e.stderr

    script = patched_train(tmp_path / "stopped.py", (
        "real = train.batches\n"
        "def batches(*a, **k):  # SIGTERM to rank 1 during the second epoch's first step\n"
        "    for i, batch in enumerate(real(*a, **k)):\n"
        "        if os.environ['RANK'] == '1' and k.get('shuffle_seed', 0) % 100003 == 1 and i == 0:\n"
        "            signal.raise_signal(signal.SIGTERM)\n"
        "        yield batch\n"
        "train.batches = batches"))
    r = torchrun(script, *common, "--out", tmp_path / "b.pt")
    assert r.returncode != 0 and "--resume" in r.stdout and "Traceback" not in r.stdout, r.stdout + r.stderr
    stopped = torch.load(tmp_path / "b.pt", weights_only=True)
    assert (stopped["epoch"], stopped["step_in_epoch"]) == (1, 2)
    r = torchrun(os.path.join(HERE, "train.py"), "--resume", "--out", tmp_path / "b.pt", "--data", tmp_path)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stdout + r.stderr
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

