"""A study's arms: named sets of train.py flags, defined by study.py's --losses, --arm and --grid, and checked
against train.py and the study's stored arms before any run starts.

    define("ce", ['lam0=--lam 0'], ["temperature=0.05,0.2"])   # {"ce": [...], "lam0": [...], "temperature0.05": ...}
    check("lam0", ["--lam", "0"], shared_flags)                 # train.py's parsed args for that arm, or CLIError
"""
import re
import shlex

import repo  # noqa: F401  the repository root on sys.path (research/repo.py)
import train
from cli import CLIError, flag_names

STUDY_FLAGS = {"--seed", "--out", "--resume"}  # study.py sets these for every run
SHARED_ONLY = {"data", "dataset", "device"}  # the data and device every arm is evaluated on: after -- only
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*$")  # an arm's name is part of its file names


def define(losses, arm_texts, grid_texts):
    """{name: train.py flags} from --losses (a comma-separated string or None), --arm and --grid (lists of their
    texts), in that order; CLIError on a bad definition."""
    arms = {}

    def add(name, flags, where):
        if not NAME.match(name):
            raise CLIError(f"argument {where}: arm name {name!r} must be letters, digits and . _ + - (it names files)")
        if name in arms:
            raise CLIError(f"argument {where}: arm {name} is defined twice")
        arms[name] = flags

    losses = losses.split(",") if losses is not None else []
    for loss in [s.strip() for s in losses]:
        if loss not in train.LOSSES:
            raise CLIError(f"argument --losses: {loss!r} is not a loss; choose from {','.join(train.LOSSES)}")
        add(loss, ["--loss", loss], "--losses")
    for text in arm_texts:
        name, eq, flags = text.partition("=")
        try:
            flags = shlex.split(flags)
        except ValueError as e:
            raise CLIError(f"argument --arm: {text!r}: {e}")
        if not eq or not flags or not flags[0].startswith("--"):
            raise CLIError(f'argument --arm: {text!r} is not NAME="TRAIN.PY FLAGS", e.g. lam0="--loss anchor --lam 0"')
        add(name.strip(), flags, "--arm")
    for text in grid_texts:
        key, eq, values = text.partition("=")
        key = key.strip().removeprefix("--")
        values = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key or not values:
            raise CLIError(f"argument --grid: {text!r} is not FLAG=V,V, e.g. lam=0,0.3,3 (a train.py flag without --)")
        for v in values:
            add(f"{key}{v.replace('/', '_')}", [f"--{key}", v], "--grid")  # eps=8/255: arm eps8_255
    return arms


def dests(flags):
    """The train.py settings that `flags` name (--no-channels-last and --channels-last are one), unknown ones as
    typed (train.py refuses them with its own message)."""
    known = {o: a.dest for a in train.parser()._actions for o in a.option_strings}
    return {known.get(f, f) for f in flag_names(flags)}


def check(name, flags, shared):
    """CLIError unless the arm's flags, with the shared ones, are a train.py command line that train.py accepts,
    no setting is made both by the arm and after -- (one would silently win), and the arm leaves the data and
    device to the shared flags."""
    taken = [f for f in flag_names(flags) if f in STUDY_FLAGS]
    if taken:
        raise CLIError(f"arm {name}: study.py sets {taken[0]} itself; drop it")
    both = sorted(dests(flags) & dests(shared))
    if both:
        raise CLIError(f"arm {name}: --{both[0].replace('_', '-')} is set by the arm and in the shared train.py "
                       "flags after --; set it in one place")
    own = sorted(dests(flags) & SHARED_ONLY)
    if own:
        raise CLIError(f"arm {name}: --{own[0]} belongs in the shared flags after --: every arm is evaluated on "
                       "the same data and device")
    try:
        return train.get_args(shared + flags + ["--seed", "0", "--out", "x.pt"])
    except CLIError as e:
        raise CLIError(f"arm {name}: train.py flags {' '.join(flags)}: {e}") from None


def missing_arm(args, names):
    """(flag, arm): the first arm that --reference or --compare names and `names` lacks; None if there is none."""
    named = [("--reference", args.reference)] + [("--compare", a) for pair in args.compare for a in pair]
    return next(((flag, a) for flag, a in named if a is not None and a not in names), None)


def settle(args, saved):
    """The arms this invocation runs, checked against the study's stored ones; -> every known arm's flags. No arm
    named: the stored ones (a rerun of the same study), or in a new study the four losses."""
    known = dict(saved.get("arms", {}))
    if not args.arms and args.only is None:
        args.arms = dict(known) or {loss: ["--loss", loss] for loss in train.LOSSES}
    for name, flags in args.arms.items():
        if name in known and known[name] != flags:
            raise CLIError(f"arm {name} is stored in {args.out}/study.json with flags {' '.join(known[name])!r}, not "
                           f"{' '.join(flags)!r}; give it another name, or choose another --out")
        known.setdefault(name, flags)
    if args.only is not None:
        unknown = [a for a in args.only if a not in known]
        if unknown or not args.only:
            raise CLIError(f"--only: {unknown[0] if unknown else '(empty)'} is not an arm of this study; known arms: "
                           f"{','.join(known) or 'none yet'}")
        args.arms = {a: known[a] for a in args.only}
    missing = missing_arm(args, known)
    if missing:
        raise CLIError(f"{missing[0]}: {missing[1]} is not an arm of this study; known arms: {','.join(known)}")
    args.parsed = {name: check(name, flags, args.train_flags) for name, flags in args.arms.items()}
    return known
