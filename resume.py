"""Checkpoints on disk: the files train.py writes, what a checkpoint holds, reading one back, continuing a run.

    ckpt = load_checkpoint(path)                   # a checkpoint of this project, or CLIError saying what is wrong
    model = model_from_checkpoint(ckpt, path)      # its network with its weights (eval.py)
    ckpt = read_run(args)                          # None for a new run (its files must be free), else the checkpoint
    state = checkpoint(run, args, epoch, step)     # plain types and CPU tensors; every rank's RNG and BatchNorm
    restore(run, args, ckpt)                       # weights, optimizer, counters and this rank's RNG, in set-up
    restore_rank_buffers(model, ckpt, rank)        # this rank's BatchNorm statistics, after the DDP wrap

A resumed run equals the run never stopped, bit for bit on the CPU (test_cli.py, test_ddp.py check it).
"""
import os

import torch

import ddp
from cli import CLIError, to_cpu
from data import DATASETS
from model import ARCHS, arch_key, build_model
from step import make_optimizer, unused_flag

# Flags that do not change what is trained: on --resume they may differ from the checkpoint's.
RUNTIME_FLAGS = {"data", "device", "compile", "channels_last", "out", "resume", "sync_bn"}
RESUME_KEYS = {"model", "optimizer", "finetune", "epoch", "step_in_epoch", "config", "device", "running", "rng",
               "metrics"}


def paths(out):
    stem = out[:-3] if out.endswith(".pt") else out
    return {"best": stem + ".best.pt", "log": stem + ".jsonl", "svg": stem + ".svg"}


def run_config(args):
    """The flags that decide the result, as plain types for the checkpoint."""
    return {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS | {"explicit"}}


def read_run(args):
    """The checkpoint to resume (its recipe copied into args), or None for a new run whose files are free. Refused:
    a typed flag that the checkpoint's loss does not read, or that contradicts or postdates its recipe."""
    if not args.resume:
        taken = [p for p in [args.out, *paths(args.out).values()] if os.path.exists(p)]
        if taken:
            raise CLIError(f"{taken[0]} exists; pass --resume to continue that run, or choose another --out")
        return None
    ckpt = load_checkpoint(args.out)
    missing = RESUME_KEYS - set(ckpt)
    if missing or not isinstance(ckpt["config"].get("train"), dict):
        raise CLIError(f"--resume: {args.out} lacks {sorted(missing) or ['config.train']}: it was not written "
                       "by this train.py; start a new --out")
    train = ckpt["config"]["train"]
    # older runs lack these; their fine-tuning stage restarted at --lr
    saved = {"dataset": "cifar10", "arch": "resnet18", "finetune_lr": train.get("lr"), **train}
    flag = unused_flag(saved.get("loss"), args.explicit)
    if flag:
        raise CLIError(f"--resume: {args.out} was trained with --loss {saved['loss']}, which does not use {flag}; "
                       "drop the flag")
    newer = sorted(k for k in args.explicit - RUNTIME_FLAGS if k not in saved)
    if newer:  # a flag younger than the checkpoint: its run trained without it
        raise CLIError(f"--resume: {args.out} was written before --{newer[0].replace('_', '-')} existed; drop the "
                       "flag to continue it, or start a new --out")
    changed = [k for k in args.explicit if k in saved and saved[k] != getattr(args, k)]
    if changed:
        k = sorted(changed)[0]
        raise CLIError(f"--resume: {args.out} was trained with --{k.replace('_', '-')} {saved[k]}, not "
                       f"{getattr(args, k)}; drop the flag to continue it, or start a new --out")
    for k, v in saved.items():  # the checkpoint's recipe wins: the resumed run equals an uninterrupted one
        setattr(args, k, v)
    if "device" not in args.explicit:  # the same device's generators give the same data order
        args.device = ckpt["device"]
    if "channels_last" not in args.explicit:  # the same layout rounds the same; checkpoints without it: NCHW
        args.channels_last = ckpt.get("channels_last", False)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--resume: {args.out} was trained on cuda, which this machine lacks; pass --device cpu "
                       "(the run continues, but not bit for bit)")
    return ckpt


def load_checkpoint(path):
    """Load a checkpoint of this project, or raise CLIError saying what is wrong with the file."""
    if not os.path.isfile(path):
        raise CLIError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:  # the file itself is unreadable (permissions, a disk error), whatever it holds
        raise CLIError(f"checkpoint {path} cannot be read: {e.strerror or e}") from None
    except Exception:  # torch's own text is about zip internals ("internal miniz error"), cut here mid-word
        raise CLIError(f"checkpoint {path} cannot be read: the file is truncated (a copy or save that did not "
                       "finish) or not a checkpoint; copy it again, or use another (the run's .best.pt)") from None
    if not (isinstance(ckpt, dict) and {"model", "config", "epoch"} <= set(ckpt) and isinstance(ckpt["model"], dict)
            and isinstance(ckpt["config"], dict) and isinstance(ckpt["config"].get("model"), dict)
            and isinstance(ckpt["config"].get("train", {}), dict)):
        raise CLIError(f"{path} is not a checkpoint of this project (expected a dict with model, config, epoch)")
    arch = ckpt["config"]["model"].get("arch", "resnet18")
    try:
        arch_key(arch)
    except ValueError:
        raise CLIError(f"{path} holds a {arch!r} network, which this model.py does not build (it has "
                       f"{', '.join(a for a in ARCHS if a != 'wrn-D-K')} and wrn-DEPTH-WIDEN): use the code that "
                       "trained it, or a version of this project that has that architecture") from None
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The checkpoint's model, or CLIError where its weights or its class count do not fit."""
    try:
        model = build_model(ckpt["config"]["model"])
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"{path} does not fit this project's model ({str(e).splitlines()[0][:160]})")
    dataset = ckpt["config"].get("train", {}).get("dataset", "cifar10")  # older checkpoints are CIFAR-10's
    classes = model.config["num_classes"]
    if dataset in DATASETS and DATASETS[dataset].num_classes != classes:
        raise CLIError(f"{path} holds a {classes}-class model but names data set {dataset} ("
                       f"{DATASETS[dataset].num_classes} classes): it was not written by this train.py; pick "
                       "another file")
    return model


def checkpoint(run, args, epoch, step):
    """The run's state as plain types and CPU tensors: loads with torch.load(path, weights_only=True) anywhere.
    Every rank calls it (the ranks' RNG states are gathered); rank 0 writes it."""
    rng = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"model": to_cpu(run.model.state_dict()), "optimizer": to_cpu(run.opt.state_dict()),
            "finetune": run.opt.finetune, "epoch": epoch, "step_in_epoch": step,
            "config": {"model": run.model.config, "train": run_config(args)}, "device": run.device.type,
            "channels_last": args.channels_last, "world_size": run.world, "running": run.running.cpu(),
            "rng": ddp.gather(rng, run.world), "metrics": {"history": run.history, "best_val_robust": run.best},
            # every rank's BatchNorm statistics: they drift apart between epochs, and each rank's attack reads its own
            "rank_buffers": ddp.gather(to_cpu(dict(run.model.named_buffers())), run.world) if run.world > 1 else []}


def restore(run, args, ckpt):
    """A new run's state (set_up's namespace) set to the checkpoint's: weights, the optimizer of its stage,
    counters, history and this rank's RNG."""
    model, rank, device = run.model, run.rank, run.device
    model.load_state_dict(ckpt["model"])
    run.epoch, run.step = ckpt["epoch"], ckpt["step_in_epoch"]
    run.history, run.best = ckpt["metrics"]["history"], ckpt["metrics"]["best_val_robust"]
    run.opt = make_optimizer(model, args, ckpt["finetune"])
    run.opt.load_state_dict(ckpt["optimizer"])
    if rank == 0:  # the saved sums are over all ranks: rank 0 carries them on
        run.running.copy_(ckpt["running"])
    states = [ckpt["rng"]] if isinstance(ckpt["rng"], dict) else ckpt["rng"]  # one per rank
    if rank < len(states):
        torch.set_rng_state(states[rank]["cpu"])
        if device.type == "cuda" and "cuda" in states[rank]:
            torch.cuda.set_rng_state(states[rank]["cuda"], device)
    print(f"resuming {args.out} at epoch {run.epoch + 1}, step {run.step}")


def restore_rank_buffers(model, ckpt, rank):
    """This rank's own BatchNorm statistics from the checkpoint (none for a new run or one process). Called after
    the DDP wrap, which gives every rank rank 0's: each rank's attack reads its own, as in the run never stopped."""
    own = (ckpt or {}).get("rank_buffers", [])
    if rank < len(own):
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(own[rank][name])
