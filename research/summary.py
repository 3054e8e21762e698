"""study.py's aggregation: rows.jsonl -> summary.md (tables) and summary.svg (a point per seed), by arm.

    python study.py --out results/cpu_study --summarize     # rewrites both from the rows

Every arm is paired by seed with a reference arm (default: ce where it ran), with a 95% t-interval over the seed
differences. The validation ranking covers every arm, the test tables the arms evaluated on the test set.
"""
import json
import math
import os
import statistics

import repo  # noqa: F401  the repository root on sys.path (research/repo.py)
from cli import save_atomic_text

TEST_METRICS = [("clean", "clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack")]
LAST_METRICS = [("last_clean", "clean, last epoch"), ("last_pgd20", "PGD-20, last epoch")]  # study.py --eval-last
VAL_METRICS = [("val_clean", "val clean"), ("val_pgd", "val PGD")]
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 2.0 beyond (2.021 at 40, 1.96 at infinity).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def arm_of(row):
    return row.get("arm", row["loss"])  # rows written before arms existed are named by their loss


def value(row, metric):
    """A row's accuracy on `metric`: a validation one (val_clean, val_pgd) or a test one; None if not measured."""
    return row.get(metric) if metric.startswith("val_") else row.get("accuracy", {}).get(metric)


def latest(rows):
    """{(arm, seed): row}: the last finished row of each, a test-evaluated row winning over a validation-only one."""
    best = {}
    for r in rows:
        key = (arm_of(r), r["seed"])
        if r["status"] == "ok" and (key not in best or not r.get("val_only") or best[key].get("val_only")):
            best[key] = r
    return best


def mean_sd(values):
    return (statistics.mean(values) if values else math.nan,
            statistics.stdev(values) if len(values) > 1 else math.nan)


def paired(runs, arm, reference, metric):
    """(mean, half-width of the 95% t-interval, number of seeds) of arm - reference over the seeds both have.
    runs: {(arm, seed): row}, as `latest` gives."""
    diffs = []
    for (a, seed), row in runs.items():
        ref = runs.get((reference, seed))
        if a == arm and ref is not None and value(row, metric) is not None and value(ref, metric) is not None:
            diffs.append(value(row, metric) - value(ref, metric))
    mean, sd = mean_sd(diffs)
    df = len(diffs) - 1
    half = (T95[df - 1] if df <= len(T95) else 2.0) * sd / math.sqrt(len(diffs)) if df > 0 else math.nan
    return mean, half, len(diffs)


def pct(v, sd=None):
    if v is None or not math.isfinite(v):
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None and math.isfinite(sd) else "")


def diff_cell(mean, half, n):
    if not n:
        return "–"
    if not math.isfinite(half):
        return f"{100 * mean:+.1f} (1 seed)"
    if half == 0:  # every seed gave the same difference: no spread to build an interval from
        return f"{100 * mean:+.1f} (no spread over {n} seeds)"
    return f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]" + (" *" if abs(mean) > half else "")


def epochs_of(row):
    return [e for e in row.get("history", []) if e["stage"] == "train"]


def arm_table(runs, arms, metrics):
    lines = ["| arm | seeds | " + " | ".join(name for _, name in metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for arm in arms:
        mine = [r for (a, _), r in runs.items() if a == arm]
        cells = [pct(*mean_sd([value(r, m) for r in mine if value(r, m) is not None])) for m, _ in metrics]
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def diff_table(runs, pairs, metrics):
    """A row per (arm, reference) pair: the paired difference on each metric."""
    lines = ["| arm | " + " | ".join(name for _, name in metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for arm, reference in pairs:
        lines.append(f"| {arm} − {reference} | " + " | ".join(diff_cell(*paired(runs, arm, reference, m))
                                                             for m, _ in metrics) + " |")
    return lines


def ranking(runs, arms, reference, flags):
    """The validation ranking: every arm by mean val PGD, its paired difference to the reference, the noise."""
    stats = {}
    for arm in arms:
        mine = [r for (a, _), r in runs.items() if a == arm and r.get("val_pgd") is not None]  # None: --val 0
        if mine:
            stats[arm] = (mean_sd([r["val_pgd"] for r in mine]), mean_sd([r["val_clean"] for r in mine]), mine)
    if not stats:
        return ["(no finished run yet)"]
    order = sorted(stats, key=lambda a: -stats[a][0][0])
    lines = ["| rank | arm | flags | seeds | epochs | val PGD | val clean | val PGD − " + reference + " | last epoch's "
             "val PGD | second term, first → last epoch |", "|---" * 10 + "|"]
    for i, arm in enumerate(order, 1):
        (pgd, pgd_sd), (clean, clean_sd), mine = stats[arm]
        first_last = [mean_sd([epochs_of(r)[k]["second"] for r in mine if epochs_of(r)])[0] for k in (0, -1)]
        trend = f"{first_last[0]:.3f} → {first_last[1]:.3f}" if all(map(math.isfinite, first_last)) else "–"
        diff = "(reference)" if arm == reference else diff_cell(*paired(runs, arm, reference, "val_pgd"))
        arm_flags = flags.get(arm) or mine[0].get("arm_flags") or ["--loss", mine[0]["loss"]]  # older rows: the loss
        last = pct(*mean_sd([r["history"][-1]["val_pgd"] for r in mine if r.get("history")]))
        epochs = "/".join(sorted({str(len(r.get("history", []))) for r in mine}))
        lines.append(f"| {i} | {arm} | `{' '.join(arm_flags)}` | {len(mine)} | {epochs} | "
                     f"{pct(pgd, pgd_sd)} | {pct(clean, clean_sd)} | {diff} | {last} | {trend} |")
    every = [r for _, _, mine in stats.values() for r in mine]
    p = statistics.mean(r["val_pgd"] for r in every)
    n_val = every[0].get("n_val") or every[0].get("train_config", {}).get("val")  # older rows: from the flags
    spread = [s for (_, s), _, _ in stats.values() if math.isfinite(s)]
    noise = (f"Noise: one run's val PGD on {n_val} images has a binomial standard error of "
             f"{100 * math.sqrt(p * (1 - p) / n_val):.1f} points (at its mean, {100 * p:.1f}%)") if n_val else "Noise: --val unknown"
    noise += (f"; the seed-to-seed standard deviation within an arm averages {100 * statistics.mean(spread):.1f} "
              "points." if spread else "; one seed per arm gives no seed spread yet.")
    lines += ["", noise + " The same validation images serve every arm, so paired differences cancel part of the "
              "image noise, not the training noise. val PGD is that of the kept (best) epoch, a maximum over noisy "
              "epochs: an arm with more epochs to choose from gains by chance; the last epoch's is free of that."]
    return lines


def curves(runs, arms, key="second", digits=3):
    """A logged quantity per training epoch (default the second loss term), mean over seeds, a row per arm; an
    epoch without it (older rows) is left blank."""
    width = max((len(epochs_of(r)) for r in runs.values()), default=0)
    lines = ["| arm | " + " | ".join(f"ep {k + 1}" for k in range(width)) + " |", "|---" * (1 + width) + "|"]
    for arm in arms:
        mine = [epochs_of(r) for (a, _), r in runs.items() if a == arm]
        cells = [mean_sd([e[k][key] for e in mine if len(e) > k and e[k].get(key) is not None])[0]
                 for k in range(width)]
        lines.append(f"| {arm} | " + " | ".join(f"{c:.{digits}f}" if math.isfinite(c) else "" for c in cells) + " |")
    return lines


def every_run(rows):
    """A line per run (its last finished row: a validation-only row is replaced by the same run's test evaluation),
    and one per failed attempt."""
    shown = latest(rows)
    lines = ["| arm | seed | status | best epoch | val clean | val PGD | " + " | ".join(n for _, n in TEST_METRICS)
             + " | train min | CE term | second term |", "|---" * (9 + len(TEST_METRICS)) + "|"]
    for r in rows:
        if r["status"] == "ok" and shown[(arm_of(r), r["seed"])] is not r:
            continue
        if r["status"] == "ok":
            e = epochs_of(r)
            trend = [f"{e[0][k]:.3f} → {e[-1][k]:.3f}" if e else "–" for k in ("ce", "second")]
            cells = [str(r["best_epoch"]), pct(r["val_clean"]), pct(r["val_pgd"]),
                     *[pct(value(r, m)) if not r.get("val_only") else "(val only)" for m, _ in TEST_METRICS],
                     f"{r['train_s'] / 60:.1f}", *trend]
        else:
            cells = [f"failed in {r['stage']}: {r['error']}", *[""] * (5 + len(TEST_METRICS))]
        lines.append(f"| {arm_of(r)} | {r['seed']} | {r['status']} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(rows, arms, study, reference, compare=()):
    runs = latest(rows)
    flags = study.get("arms", {})
    tested = [a for a in arms if any(a == k[0] and not r.get("val_only") for k, r in runs.items())]
    evaluation = (f"{','.join(study['attacks'])} on {study['n']} test images, AutoAttack on {study['aa_n']}"
                  if "attacks" in study else "none yet (validation only)")
    lines = ["# Study summary", "", f"Shared train.py flags: `{' '.join(study['train_flags'])}`; test evaluation: "
             f"{evaluation}. Accuracy in %, mean ± standard deviation over seeds; differences in points, paired by "
             "seed, with a 95% t-interval over the seed differences (`*` where it excludes 0).", ""]
    last = any("last_clean" in r.get("accuracy", {}) for r in runs.values())
    test_metrics = TEST_METRICS + (LAST_METRICS if last else [])
    if tested:
        test_runs = {k: r for k, r in runs.items() if not r.get("val_only")}
        lines += ["## Test set", ""] + arm_table(test_runs, tested, test_metrics)
        if reference in tested:
            pairs = [(a, reference) for a in tested if a != reference]
            lines += ["", f"Difference to {reference}:", ""] + diff_table(test_runs, pairs, test_metrics)
    if compare:  # the named comparisons: validation, and the test metrics where both arms were evaluated
        metrics = VAL_METRICS + (test_metrics if tested else [])
        lines += ["", "## Comparisons", ""] + diff_table(runs, compare, metrics)
    swept = sorted((k, r) for k, r in runs.items() if r.get("eps_sweep"))
    if swept:  # eval.py --eps-sweep: accuracy should fall to ~0 at large eps, else suspect gradient masking
        lines += ["", "## PGD-20 accuracy over eps (the best checkpoint, the AutoAttack images)", "",
                  "| arm | seed | " + " | ".join(f"{round(e * 255)}/255" for e, _ in swept[0][1]["eps_sweep"])
                  + " | warnings |", "|---" * (3 + len(swept[0][1]["eps_sweep"])) + "|"]
        lines += [f"| {a} | {s} | " + " | ".join(pct(acc) for _, acc in r["eps_sweep"])
                  + f" | {'; '.join(r.get('eval_warnings', [])) or 'none'} |" for (a, s), r in swept]
    lines += ["", "## Validation ranking (the checkpoint each run keeps)", ""] + ranking(runs, arms, reference, flags)
    lines += ["", "## The second loss term per epoch, mean over seeds (contrastive for anchor and supcon, KL for "
              "trades, 0 for ce)", ""] + curves(runs, arms)
    if any("con_covered" in e for r in runs.values() for e in epochs_of(r)):  # rows of train.py from 2026-12-07 on
        lines += ["", "## The contrastive term's range covered on the validation slice, per epoch (0: a uniform "
                  "batch, 1: each class collapsed; train.py's diagnose)", ""] + curves(runs, arms, "con_covered")
        lines += ["", "## The adversarial twin's weight q per epoch (1/|P| would be SupCon's)", ""]
        lines += curves(runs, arms, "q_twin", 4)
    lines += ["", "## Every run", ""] + every_run(rows)
    return "\n".join(lines) + "\n"


def summary_svg(rows, arms, path):
    """One panel per metric (val PGD, then the test metrics measured): the arms across, a dot per seed, a bar at
    the mean (accuracy in %)."""
    runs = latest(rows)
    metrics = [m for m in [VAL_METRICS[1]] + TEST_METRICS if any(value(r, m[0]) is not None for r in runs.values())]
    step = 38 if len(arms) > 4 else 46
    W, H, L, T, B = max(230, 55 + step * len(arms)), 320, 45, 30, 60  # one panel
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * max(1, len(metrics))}" height="{H}" '
           'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for k, (m, name) in enumerate(metrics):
        vals = [100 * value(r, m) for r in runs.values() if value(r, m) is not None]
        lo, hi = math.floor(min(vals) / 5) * 5, math.ceil(max(vals) / 5) * 5 + (5 if min(vals) == max(vals) else 0)
        x0 = k * W + L
        py = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)
        out.append(f'<text x="{x0}" y="16" font-size="13">{name} accuracy (%)</text>')
        for tick in range(int(lo), int(hi) + 1, 5):
            out.append(f'<line x1="{x0}" x2="{x0 + W - L - 10}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" stroke="#ddd"/>'
                       f'<text x="{x0 - 4}" y="{py(tick) + 4:.1f}" text-anchor="end">{tick}</text>')
        dx = (W - L - 10) / len(arms)
        for i, arm in enumerate(arms):
            cx = x0 + dx * (i + 0.5)
            mine = sorted((seed, 100 * value(r, m)) for (a, seed), r in runs.items() if a == arm and value(r, m) is not None)
            out.append(f'<text transform="translate({cx:.1f},{H - B + 12}) rotate(35)" font-size="10">{arm}</text>')
            for j, (seed, v) in enumerate(mine):
                out.append(f'<circle cx="{cx + 5 * (j - (len(mine) - 1) / 2):.1f}" cy="{py(v):.1f}" r="3" '
                           f'fill="{colors[i % len(colors)]}" fill-opacity="0.6"><title>{arm} seed {seed}: {v:.1f}</title></circle>')
            if mine:
                mean = statistics.mean(v for _, v in mine)
                out.append(f'<line x1="{cx - 12:.1f}" x2="{cx + 12:.1f}" y1="{py(mean):.1f}" y2="{py(mean):.1f}" '
                           f'stroke="black" stroke-width="2"><title>{arm} mean {mean:.2f}</title></line>')
    out.append("</svg>")
    save_atomic_text("\n".join(out) + "\n", path)


def summarize(out, rows, reference=None, compare=()):
    """Rewrite OUT/summary.md and OUT/summary.svg from `rows`; the reference arm defaults to ce where it ran.
    compare: (arm, reference) pairs, each given its own line of paired differences."""
    study = json.load(open(os.path.join(out, "study.json")))
    known = list(study.get("arms", {}))  # the order the arms were defined in
    arms = known + [a for a in dict.fromkeys(arm_of(r) for r in rows) if a not in known]
    if "ce" in arms:
        arms.remove("ce")
        arms.insert(0, "ce")  # the baseline first
    ran = {arm_of(r) for r in rows if r["status"] == "ok"}
    arms = [a for a in arms if a in {arm_of(r) for r in rows}]
    reference = reference or ("ce" if "ce" in ran else next((a for a in arms if a in ran), None))
    save_atomic_text(summary_markdown(rows, arms, study, reference, compare), os.path.join(out, "summary.md"))
    if ran:
        summary_svg(rows, [a for a in arms if a in ran], os.path.join(out, "summary.svg"))
