"""train.py under torchrun: the few things several processes need, kept apart so train.py reads as one process.

    torchrun --nproc_per_node 8 train.py ...     # one process per GPU (NCCL); --device cpu: gloo on the CPU

Every function takes the world size and is a no-op (or the identity) for one process, so plain
`python train.py` runs exactly as if this file did not exist. The rules the helpers keep:
- all ranks make the same collective calls in the same order, so a decision (stop here, this input is bad)
  is agreed on first and then taken by every rank at the same step;
- rank 0 alone prints and writes files; a user error is one line from rank 0, and every rank exits non-zero.
"""
import gc
import os
import sys

import torch
import torch.distributed as dist

from cli import CLIError


def start(device, batch_size, sync_bn):
    """-> (rank, world size). Under torchrun (RANK set): join the process group, NCCL with one GPU per process
    on CUDA, gloo on the CPU, and silence stdout on all but rank 0. Otherwise (0, 1) and nothing happens."""
    if "RANK" not in os.environ:
        if sync_bn:
            raise CLIError("--sync-bn needs several processes: launch with torchrun --nproc_per_node N")
        return 0, 1
    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise CLIError(f"RANK is set but {missing[0]} is not: launch with torchrun --nproc_per_node N, or unset RANK")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints; cli.py prints rank 0's errors only
    if device == "cuda":
        per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
        if per_node > gpus:
            raise CLIError(f"torchrun started {per_node} processes on a machine with {gpus} GPUs; each needs its "
                             f"own: use --nproc_per_node {gpus} or fewer")
        if not dist.is_nccl_available():
            raise CLIError("--device cuda under torchrun needs NCCL, which this torch build lacks; use --device cpu")
        torch.cuda.set_device(local)
    elif sync_bn:
        raise CLIError("--sync-bn is for --device cuda; on the CPU each process keeps its own BatchNorm statistics")
    if batch_size % world:
        raise CLIError(f"--batch-size {batch_size} does not split over {world} processes; use a multiple of {world}")
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return rank, world


def local_device(device, world):
    """This process's torch.device: under torchrun on CUDA, the GPU numbered LOCAL_RANK."""
    if world > 1 and device == "cuda":
        return torch.device(device, int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def agreed(step, world, errors):
    """step() on every rank -> its result. If it raised one of `errors` on any rank, every rank raises CLIError
    with the first such message (rank 0's own, or 'rank k: ...'), so all stop together and rank 0 says why.
    step must make no collective call: a rank that failed before it would wait in a different one."""
    error, result = None, None
    try:
        result = step()
    except errors as e:
        error = str(e)
    messages = gather(error, world)
    first = next((m if r == 0 else f"rank {r}: {m}" for r, m in enumerate(messages) if m), None)
    if first:
        raise CLIError(first)
    return result


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; [obj] for one process)."""
    objs = [obj] * world
    if world > 1:
        dist.all_gather_object(objs, obj)
    return objs


def any_rank(flag, world, device):
    """True on every rank if `flag` is true on any: the ranks leave a loop at the same step."""
    if world == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


class Leave:
    """Whether the epoch's loop should end after this step: a stop signal, or a non-finite running loss. In one
    process the signal is read every step and the loss (a host sync) only when `refreshed` (the progress bar's
    occasional refresh). Under torchrun every rank must leave at the same step, whichever rank saw the signal:
    each step's vote is all-reduced on the device and read one step later, when it has long finished, so agreeing
    never stalls the device; the ranks leave one step after the step that asked."""

    def __init__(self, world):
        self.world, self.last = world, None

    def __call__(self, stop, loss, refreshed):
        if self.world == 1:
            return bool(stop) or (refreshed and not bool(torch.isfinite(loss)))
        vote = (~torch.isfinite(loss) | bool(stop)).float().reshape(1)  # (1,) on the device, no host sync
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
        cuda = vote.device.type == "cuda"
        host = torch.empty(1, pin_memory=cuda)
        host.copy_(vote, non_blocking=cuda)
        done = torch.cuda.Event() if cuda else None
        if cuda:
            done.record()
        previous, self.last = self.last, (host, done)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()  # the previous step's vote: finished long ago
        return bool(previous[0])


def all_sum(t, world):
    """t summed over ranks, in place."""
    if world > 1:
        dist.all_reduce(t)
    return t


def wrap(model, net, device, world, compile=False):
    """What the training update calls: `net` (the model or its compiled wrapper) in one process; under torchrun
    DistributedDataParallel around the model, compiled after wrapping with --compile: the order PyTorch documents
    for compiled DDP, whose graph is split at the gradient buckets so that each all-reduce overlaps the rest of the
    backward. Build it anew after every new optimizer: DDP waits for gradients of exactly the parameters that
    require them at construction."""
    if world == 1:
        return net
    ids = [device.index] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(wrapped, dynamic=False) if compile else wrapped


def share_buffers(model, world):
    """Rank 0's BatchNorm statistics on every rank (they drift apart in training), before validating or saving."""
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def peer_failed(error, world):
    """Whether `error` is how the backend reports another process that died (gloo: 'Connection closed by peer')."""
    return world > 1 and isinstance(error, RuntimeError) and "peer" in str(error)


def stop():
    """Leave the process group. The caller drops its DDP wrappers first; they sit in reference cycles, so they are
    collected here, while the interpreter is whole. One freed at exit, after its group, made gloo abort the exit
    of a finished run ("terminate called without an active exception": 5 of 31 torchrun runs, torch 2.13 on the
    CPU; 0 of 120 since)."""
    if dist.is_initialized():  # torchrun with one process too
        gc.collect()
        dist.destroy_process_group()
