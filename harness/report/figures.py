"""The report's figures, each drawn from run dicts only, each returned with the caption printed under it."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from harness.report.studies import (COLORS, COMPARISONS, TORCHSSL, Budget, algorithm_name, arm_name, evaluated_on)
from harness.stats import paired

# The training statistics each algorithm's curves show beside the accuracy: (name, scale, title, y label).
PANELS = {
    "fixmatch": (("mask_rate", 100, "mask rate (pseudo-labels accepted)", "accepted unlabelled images (%)"),
                 ("pseudo_acc", 100, "accuracy of accepted pseudo-labels", "correct among accepted (%)")),
    "mixmatch": (("lambda_u", 1, "λu(t), the ramped weight of L_U", "λu"),
                 ("loss_u", 1, "L_U, squared error on the mixed unlabelled rows", "L_U"),
                 ("guess_acc", 100, "accuracy of the guessed labels", "argmax of the guess correct (%)")),
}
# Published CIFAR-10 accuracies (100 - error), by labels, with the protocol they come from; drawn only for a study
# that follows that protocol.
ANCHORS = {
    "fixmatch": (
        ("FixMatch paper (RA), median of last 20", {40: 86.19, 250: 94.93, 4000: 95.74}),
        ("FixMatch paper (CTA), median of last 20", {40: 88.61, 250: 94.93, 4000: 95.69}),
        ("TorchSSL, best test accuracy", {40: 92.53, 250: 95.14, 4000: 95.79}),
    ),
    "mixmatch": (
        ("MixMatch paper, median of last 20", {250: 88.92, 4000: 93.76}),
        ("TorchSSL, best test accuracy", {40: 63.81, 250: 86.37, 4000: 93.34}),
    ),
}
ANCHOR_MARKERS = ("*", "P", "X")
PAPER_PROTOCOL = {"steps": 2**20, "batch_size": 64, "eval_subset": 0}  # and each algorithm's own uratio


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def series(metrics: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((m["step"], m[key]) for m in metrics if m.get("kind") == kind and m.get(key) is not None
                 and not (isinstance(m[key], float) and math.isnan(m[key])))
    return [p[0] for p in pts], [p[1] for p in pts]


def chance(spec: dict) -> float:
    return 100.0 / spec.get("num_classes", 10)


def curves_figure(b: Budget, algorithm: str, spec: dict, path: Path) -> str:
    """Accuracy over steps, and the algorithm's training statistics, for one budget; x shared. Returns the caption."""
    import numpy as np

    plt = _plt()
    panels = PANELS.get(algorithm, ())
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4), squeeze=False, sharex=True)
    axes = axes[0]
    for a in b.arms:
        rs = list(b.by_arm[a].values())
        label, color = arm_name(a), COLORS.get(a)
        curves = [series(r["metrics"], "eval", "top1") for r in rs]
        for steps, acc in curves:
            axes[0].plot(steps, acc, color=color, alpha=0.35 if len(rs) > 1 else 1.0, lw=1,
                         marker="o" if len(steps) < 30 else None, ms=3, label=None if len(rs) > 1 else label)
        common = set.intersection(*(set(s) for s, _ in curves)) if curves else set()
        if len(rs) > 1 and common:  # the mean over seeds where every seed was evaluated, and their range
            xs = sorted(common)
            ys = np.array([[dict(zip(s, acc))[x] for x in xs] for s, acc in curves])
            axes[0].plot(xs, ys.mean(0), color=color, lw=2, label=f"{label}: mean of {len(rs)} seeds, band min–max")
            axes[0].fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        for ax, (key, scale, _, _) in zip(axes[1:], panels):
            for i, r in enumerate(rs):
                if key == "pseudo_acc":  # points sized by the accepted share: nothing where none was accepted
                    s, acc = series(r["metrics"], "train", key)
                    rate = dict(zip(*series(r["metrics"], "train", "mask_rate")))
                    sizes = [4 + 200 * rate.get(x, 0.0) for x in s]
                    ax.scatter(s, [scale * v for v in acc], s=sizes, color=color, alpha=0.5,
                               label=label if i == 0 else None)
                    continue
                s, v = series(r["metrics"], "train", key)
                if s:
                    ax.plot(s, [scale * x for x in v], color=color, alpha=0.8, lw=1, label=label if i == 0 else None)
    axes[0].axhline(chance(spec), color="gray", ls="--", lw=1, label=f"chance ({chance(spec):.0f}%)")
    subset = "test set" if spec["eval_subset"] == 0 else f"{spec['eval_subset']}-image test subset"
    axes[0].set(title=f"EMA model, {subset}, {b.n} labels", xlabel="step", ylabel="top-1 accuracy (%)")
    for ax, (_, _, title, ylabel) in zip(axes[1:], panels):
        ax.set(title=f"{title}, {b.n} labels", xlabel="step", ylabel=ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    panel_text = "; ".join(t for _, _, t, _ in panels)
    extra = (" The pseudo-label panel has one point per training record, sized by the share of unlabelled images "
             "accepted in it; none where none was." if algorithm == "fixmatch" else "")
    return (f"{algorithm_name(algorithm)}, {b.n} labels: top-1 of the EMA model on {evaluated_on(spec)} at each "
            f"evaluation, one thin line per seed (a thick line and band: the mean over seeds and their range where "
            f"several ran); the dashed line is chance. Then, per training record (a window of "
            f"{spec.get('log_every')} steps): {panel_text}.{extra}")


def labels_figure(budgets: list[Budget], algorithm: str, spec: dict, key: str, key_name: str, path: Path) -> str:
    """Accuracy against labels: each arm's mean over seeds with its 95% interval, every seed's point, and the
    published numbers where the protocol is theirs. Returns the caption."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    arms = [a for a in COLORS if any(a in b.by_arm for b in budgets)]
    for j, a in enumerate(arms):
        xs, means, lows, highs = [], [], [], []
        for b in budgets:
            if a not in b.by_arm or not b.seeds:
                continue
            values = [r[key] for r in b.results(a)]
            x = b.n * (1 + 0.04 * (j - (len(arms) - 1) / 2))  # side by side on the log axis
            ax.scatter([x] * len(values), values, s=12, color=COLORS[a], alpha=0.5)
            p = paired(values)
            xs.append(x), means.append(p.mean)
            lows.append(p.mean - (p.low if p.low is not None else p.mean))
            highs.append((p.high if p.high is not None else p.mean) - p.mean)
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], color=COLORS[a], marker="o", capsize=3, lw=1.5,
                        label=arm_name(a))
    drawn = follows_paper_protocol(spec, algorithm)
    if drawn:
        for (name, values), marker in zip(ANCHORS.get(algorithm, ()), ANCHOR_MARKERS):
            ns = [n for n in sorted(values) if any(b.n == n for b in budgets)]
            ax.scatter(ns, [values[n] for n in ns], marker=marker, s=70, color="black", facecolors="none",
                       label=f"published: {name}")
    ax.axhline(chance(spec), color="gray", ls="--", lw=1, label=f"chance ({chance(spec):.0f}%)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.0))  # an interval of two seeds can reach past what accuracy can be
    ax.set_xscale("log")
    ns = [b.n for b in budgets]
    ax.set_xlim(min(ns) / 1.6, max(ns) * 1.6)  # one budget alone still reads as a point on a log axis
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set(title=f"{algorithm_name(algorithm)}: {key_name} top-1 against labels", xlabel="labelled images (log scale)",
           ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    anchors = ("Published numbers (hollow black marks) are drawn: this study follows the paper's protocol (2^20 "
               "steps, B = 64, the whole test set); they come from the original pixels and, for TorchSSL, are best "
               "test accuracies." if drawn else
               "Published numbers are not drawn: this study's protocol "
               f"({spec['steps']} steps, B = {spec['batch_size']}, {evaluated_on(spec)}) is not the paper's.")
    return (f"{algorithm_name(algorithm)}: the {key_name} top-1 on {evaluated_on(spec)}, per arm the mean over the "
            f"seeds every arm finished with a 95% Student-t interval (none for one seed), and each seed's value as "
            f"a dot. {anchors}")


def follows_paper_protocol(spec: dict, algorithm: str) -> bool:
    uratio = 7 if algorithm == "fixmatch" else 1
    return all(spec.get(k) == v for k, v in PAPER_PROTOCOL.items()) and spec.get("uratio") == uratio


def forest_rows(budgets: list[Budget], key: str, extra: list[tuple[str, Budget, object, object]] = ()) -> list:
    """(label, Paired) per comparison and budget with paired seeds, then `extra` rows (title, budget, a, b)."""
    rows = []
    for c in COMPARISONS:
        for b in budgets:
            if c.a in b.by_arm and c.b in b.by_arm and b.seeds:
                rows.append((f"{c.title}, {b.n} labels", b.compare(c.a, c.b, key)))
    for title, b, a, other in extra:
        if b.seeds:
            rows.append((f"{title}, {b.n} labels", b.compare(a, other, key)))
    return rows


def forest_figure(rows: list, algorithm: str, key_name: str, path: Path,
                  what: str = "each comparison of the tables above") -> str:
    """Each comparison per budget: mean difference and 95% interval, n printed; zero line. Returns the caption."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4))
    for i, (label, p) in enumerate(reversed(rows)):
        low = p.low if p.low is not None else p.mean
        high = p.high if p.high is not None else p.mean
        ax.plot([low, high], [i, i], color="black", lw=1.5)
        ax.plot(p.mean, i, "o", color="tab:blue" if "implementation" in label else "tab:purple")
        ax.text(1.01, i, f"n={p.n}" + ("" if p.low is not None else " (no interval)"), va="center", fontsize=8,
                transform=ax.get_yaxis_transform())
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    ax.set(title=f"{algorithm_name(algorithm)}: differences in {key_name} top-1 (points)",
           xlabel="mean paired difference, 95% Student-t interval")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    _save(fig, path)
    return (f"{algorithm_name(algorithm)}: {what}, per budget: the mean per-seed "
            f"difference in {key_name} top-1 and its 95% Student-t interval (a lone point where n = 1); a row whose "
            f"interval crosses the dashed zero line detected no difference at its n.")


def throughput_figure(budgets: list[Budget], path: Path) -> str | None:
    """Each arm's training steps/s as a ratio to TorchSSL's on the same device, seed by seed (points) and their
    mean (bars); None where there is no TorchSSL run to divide by."""
    ratios = defaultdict(lambda: defaultdict(list))  # arm -> budget -> per-seed ratios
    devices = set()
    for b in budgets:
        if TORCHSSL not in b.by_arm:
            continue
        for a in [a for a in b.arms if a != TORCHSSL]:  # TorchSSL is the dashed line at 1
            for seed in b.seeds:
                mine, ref = b.by_arm[a][seed]["result"], b.by_arm[TORCHSSL][seed]["result"]
                if mine.get("device_name") != ref.get("device_name") or not ref.get("steps_per_second"):
                    continue
                devices.add(ref.get("device_name") or ref.get("device"))
                ratios[a][b.n].append((mine.get("steps_per_second") or 0.0) / ref["steps_per_second"])
    if not ratios:
        return None
    plt = _plt()
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    arms = [a for a in COLORS if a in ratios]
    ns = sorted({n for a in arms for n in ratios[a]})
    width = 0.8 / len(arms)
    for j, a in enumerate(arms):
        xs = np.arange(len(ns)) + (j - (len(arms) - 1) / 2) * width
        means = [statistics.mean(ratios[a][n]) if ratios[a][n] else 0.0 for n in ns]
        ax.bar(xs, means, width * 0.9, color=COLORS[a], alpha=0.6, label=arm_name(a))
        for x, n in zip(xs, ns):
            ax.scatter([x] * len(ratios[a][n]), ratios[a][n], s=10, color="black", zorder=3)
    ax.axhline(1, color="gray", ls="--", lw=1, label="TorchSSL (1 by definition)")
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set(title=f"training speed relative to TorchSSL\n{'; '.join(sorted(map(str, devices)))}",
           xlabel="labels", ylabel="steps/s ÷ TorchSSL's (same seed, same device)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)
    return ("Training steps per second (training only, evaluations and checkpoints excluded) of each arm divided "
            "by TorchSSL's on the same seed and device: bars are the mean, dots the single runs. On a shared CPU "
            "these ratios are rough; absolute numbers are in the table above.")


def cta_rates_figure(budgets: list[Budget], path: Path) -> str | None:
    """Which ops CTAugment learns to favour: per op, its rates' mean over bins and parameters at each evaluation
    (mean over the seeds of the CTAugment arm), one panel per budget; None without CTAugment runs."""
    panels = []
    for b in budgets:
        runs = [r for a, by_seed in b.by_arm.items() if a.recipe == "paper-cta" for r in by_seed.values()]
        records = [[m for m in r["metrics"] if m.get("kind") == "cta"] for r in runs]
        if records and all(records):
            panels.append((b.n, records))
    if not panels:
        return None
    import numpy as np

    plt = _plt()
    ops = list(panels[0][1][0][0]["rates"])
    low = min(np.nanmin([[np.mean([v for p in m["rates"][op] for v in p]) for op in ops if m["rates"][op]]
                         for _, records in panels for rs in records for m in rs]), 0.99)  # colours span what moved
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 5.5), squeeze=False, sharey=True)
    for ax, (n, records) in zip(axes[0], panels):
        steps = [m["step"] for m in records[0]]
        grid = np.mean([[[np.mean([v for param in m["rates"][op] for v in param]) if m["rates"][op] else np.nan
                          for m in rs] for op in ops] for rs in records], axis=0)  # (ops, evaluations)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=1)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
        ax.set(title=f"{n} labels ({len(records)} seed{'s' if len(records) > 1 else ''})", xlabel="step")
    axes[0][0].set_yticks(range(len(ops)), ops, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="mean rate over the op's bins")
    _save(fig, path)
    return ("CTAugment's learnt policy: for each of its 19 ops, the mean of its bin rates (1 at the start; each "
            "probe moves a bin towards how well the EMA model still recognises the image under that op) at each "
            "evaluation, averaged over seeds (the colour scale spans the values reached). Ops whose rates stay high "
            "are the ones the policy keeps drawing strongly; identity has no bins (blank).")
