"""RESULTS.md and figures/, rebuilt at any time from the result files under a results folder, and nothing else.

A run belongs to an arm (implementation and recipe: ours with the paper's recipe, ours with TorchSSL's, TorchSSL)
and a study (every other spec setting but the budget and seed). Within a study and budget, the arms are compared
on the seeds that all of them finished, and only where their split, data, step budget and applied optimizer steps
agree; everything else is listed apart, by name.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from harness.stats import Paired, paired
from harness.verify import flagged_section, load_run

ARMS = {("own", "paper"): "ours (paper recipe)", ("own", "torchssl"): "ours (TorchSSL recipe)",
        ("torchssl", "torchssl"): "TorchSSL"}
COLORS = {("own", "paper"): "tab:blue", ("own", "torchssl"): "tab:green", ("torchssl", "torchssl"): "tab:orange"}
# The two questions a study answers, each a pair of arms (a - b).
COMPARISONS = (
    ("implementation check", ("own", "torchssl"), ("torchssl", "torchssl"),
     "ours (TorchSSL recipe) - TorchSSL: the same recipe in two implementations"),
    ("recipe effect", ("own", "paper"), ("own", "torchssl"),
     "ours (paper recipe) - ours (TorchSSL recipe): one implementation, two recipes"),
)
# Spec fields that differ between the runs of one study by design; every other field defines the study.
PER_RUN_FIELDS = ("impl", "recipe", "n_labels", "seed", "split_sha256")  # the algorithm defines a study
CHECKED = ("split_sha256", "data_sha256", "steps", "optimizer_steps")  # what compared runs must share
STATISTICS = (("final_top1", "final"), ("median20_top1", "median"))


def arm(run: dict) -> tuple[str, str]:
    return run["spec"]["impl"], run["spec"].get("recipe", "paper")


def arm_name(a: tuple[str, str]) -> str:
    return ARMS.get(a, f"{a[0]} ({a[1]} recipe)")


def load_runs(out_dir: Path) -> list[dict]:
    """Every finished run under out_dir/runs: its spec, result, metrics, and the problems found cross-checking them
    (harness/verify.py; a run with problems is shown apart and never compared)."""
    runs = []
    for run_dir in sorted((Path(out_dir) / "runs").glob("*")):
        run = load_run(run_dir)  # None without result.json; else checked, with its "problems" (harness/verify.py)
        if run is not None:
            runs.append(run)
    return runs


def study_key(spec: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in spec.items() if k not in PER_RUN_FIELDS))


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def short_version(version) -> str:
    """The first 12 digits of a commit, keeping the -dirty mark that says the tree had uncommitted changes."""
    version = str(version)
    return version[:12] + ("-dirty" if version.endswith("-dirty") else "")


# ---------------------------------------------------------------------------------------------------------------
# One budget of one study: which seeds are compared, which are not


class Budget:
    """The runs of one study at one budget: per arm, per seed; the seeds every arm finished with matching
    split, data and steps (`paired`), those it did not (`unpaired`), and the mismatches."""

    def __init__(self, n: int, runs: list[dict]):
        self.n = n
        self.by_arm: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for r in runs:
            self.by_arm[arm(r)][r["spec"]["seed"]] = r
        self.arms = sorted(self.by_arm, key=lambda a: list(ARMS).index(a) if a in ARMS else len(ARMS))
        common = set.intersection(*(set(s) for s in self.by_arm.values()))
        self.mismatches: dict[int, list[str]] = {}
        for seed in sorted(common):
            results = [self.by_arm[a][seed]["result"] for a in self.arms]
            bad = [f for f in CHECKED if len({json.dumps(r.get(f)) for r in results}) > 1]
            if bad and len(self.arms) > 1:
                self.mismatches[seed] = bad
        self.seeds = sorted(common - set(self.mismatches))
        self.unpaired = [r for a in self.arms for s, r in sorted(self.by_arm[a].items()) if s not in common]

    def results(self, a: tuple, seeds=None) -> list[dict]:
        return [self.by_arm[a][s]["result"] for s in (self.seeds if seeds is None else seeds)]

    def compare(self, a: tuple, b: tuple, key: str) -> Paired | None:
        if a not in self.by_arm or b not in self.by_arm or not self.seeds:
            return None
        return paired(self.by_arm[a][s]["result"][key] - self.by_arm[b][s]["result"][key] for s in self.seeds)


# ---------------------------------------------------------------------------------------------------------------
# Sections


def median_heading(runs: list[dict]) -> str:
    windows = {r["result"].get("median_window", 20) for r in runs}
    every = {r["spec"]["eval_every"] for r in runs}
    n = min(windows)
    what = "last 20 evaluations" if n >= 20 else f"last {n} evaluations"
    if len(windows) > 1:
        what += f" (runs differ: {sorted(windows)})"
    return f"median of {what} (every {', '.join(map(str, sorted(every)))} steps)"


def results_table(budgets: list[Budget], median_title: str) -> list[str]:
    lines = [f"| labels | run | seeds | final top-1 (%) | {median_title} (%) | best top-1 (%), test-selected "
             "| steps | optimizer steps applied | wall time / run | steps/s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in budgets:
        for a in b.arms:
            res = b.results(a)
            seeds = ", ".join(map(str, b.seeds)) or "–"
            if not res:
                lines.append(f"| {b.n} | {arm_name(a)} | {seeds} | – | – | – | – | – | – | – |")
                continue

            def values(key):
                return ", ".join(str(x) for x in sorted({str(r.get(key)) for r in res}))

            sps = [r["steps_per_second"] for r in res if r.get("steps_per_second")]
            speed = f"{statistics.mean(sps):.2f}" if sps else "–"
            lines.append(
                f"| {b.n} | {arm_name(a)} | {seeds} | {mean_std([r['final_top1'] for r in res])} "
                f"| {mean_std([r['median20_top1'] for r in res])} | {mean_std([r['best_top1'] for r in res])} "
                f"| {values('steps')} | {values('optimizer_steps')} "
                f"| {fmt_seconds(statistics.mean(r['wall_seconds'] for r in res))} | {speed} |")
    return lines


def comparison_sections(budgets: list[Budget]) -> list[str]:
    lines = []
    for title, a, b, what in COMPARISONS:
        present = [bud for bud in budgets if a in bud.by_arm and b in bud.by_arm]
        if not present:
            continue
        lines += ["", f"### {title.capitalize()}: {what}", "",
                  "Per-seed differences in top-1 percentage points, on the seeds both finished with matching split, "
                  "data and steps; mean, sample std, n and the 95% Student-t confidence interval of the mean.", ""]
        lines += ["| labels | statistic | per seed (seed: a - b) | mean | std | n | 95% CI | |",
                  "|---:|---|---|---:|---:|---:|---|---|"]
        for bud in present:
            for key, name in STATISTICS:
                p = bud.compare(a, b, key)
                if p is None:
                    lines.append(f"| {bud.n} | {name} | no paired seeds | – | – | 0 | – | |")
                    continue
                per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(bud.seeds, p.diffs))
                sd = f"{p.sd:.2f}" if p.sd is not None else "–"
                ci = f"[{p.low:+.2f}, {p.high:+.2f}]" if p.low is not None else "–"
                lines.append(f"| {bud.n} | {name} | {per_seed} | {p.mean:+.2f} | {sd} | {p.n} | {ci} "
                             f"| {p.verdict()} |")
    return lines


def excluded_sections(budgets: list[Budget]) -> list[str]:
    lines = []
    bad = [(b, seed, fields) for b in budgets for seed, fields in b.mismatches.items()]
    if bad:
        lines += ["", "### ⚠ MISMATCHED RUNS (excluded from every comparison)", ""]
        for b, seed, fields in bad:
            lines.append(f"- **{b.n} labels, seed {seed}: the runs differ in {', '.join(fields)}**")
            for a in b.arms:
                r = b.by_arm[a][seed]
                vals = ", ".join(f"{f}={str(r['result'].get(f))[:16]}" for f in fields)
                lines.append(f"  - {arm_name(a)}: {vals} (`{r['dir'].name}`)")
    unpaired = [(b, r) for b in budgets for r in b.unpaired]
    if unpaired:
        lines += ["", "### Unpaired runs (not in the table: the other runs of their budget lack their seed)", ""]
        for b, r in unpaired:
            lines.append(f"- {b.n} labels, seed {r['spec']['seed']}, {arm_name(arm(r))}: final top-1 "
                         f"{r['result']['final_top1']:.2f} (`{r['dir'].name}`)")
    return lines


def settings_section(runs: list[dict]) -> list[str]:
    spec = runs[0]["spec"]
    lines = ["| setting | value (every run of this study, from the run spec) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in spec.items() if k not in PER_RUN_FIELDS]
    first = {}
    for r in sorted(runs, key=lambda r: r["spec"]["seed"]):
        first.setdefault(arm(r), r["result"])
    arms = [a for a in ARMS if a in first] + [a for a in first if a not in ARMS]
    keys = sorted({k for res in first.values() for k in res.get("impl_settings", {})})
    if keys:
        lines += ["", "How each run realises it (from each result's `impl_settings`; **bold** rows differ; "
                  "third_party/torchssl/README.md says why TorchSSL's differ):", "",
                  "| | " + " | ".join(arm_name(a) for a in arms) + " |", "|---|" + "---|" * len(arms)]
        for k in keys:
            vals = [str(first[a].get("impl_settings", {}).get(k, "–")) for a in arms]
            name = f"**{k}**" if len(set(vals)) > 1 else k
            lines.append(f"| {name} | " + " | ".join(v.replace("|", "/") for v in vals) + " |")
    lines += ["", "| run | device | machine | torch | our code version | TorchSSL commit | run-time patches |",
              "|---|---|---|---|---|---|---|"]
    for a in arms:
        res = first[a]
        lines.append(f"| {arm_name(a)} | {res.get('device')} | {res.get('device_name', '–')} "
                     f"| {res.get('torch_version')} | {short_version(res.get('code_version'))} "
                     f"| {str(res.get('torchssl_commit', '–'))[:12]} | {len(res.get('patches', []))} |")
    patches = [p for a in arms for p in first[a].get("patches", [])]
    if patches:
        lines += ["", "Run-time patches applied to TorchSSL (its files are never edited):", ""]
        lines += [f"- `{p['name']}` ({p.get('target', '')}): {p['why']}" for p in patches]
    return lines


def runs_section(runs: list[dict]) -> list[str]:
    lines = ["| run | labels | seed | split sha256 | steps | optimizer steps | resumed at | final top-1 (%) |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for r in sorted(runs, key=lambda r: (r["spec"]["n_labels"], r["spec"]["seed"], list(ARMS).index(arm(r))
                                         if arm(r) in ARMS else 9)):
        res = r["result"]
        resumed = ", ".join(map(str, res.get("resumed_at") or [])) or "never stopped"
        lines.append(f"| `{r['dir'].name}` | {r['spec']['n_labels']} | {r['spec']['seed']} "
                     f"| `{res['split_sha256'][:12]}` | {res['steps']} | {res.get('optimizer_steps')} | {resumed} "
                     f"| {res['final_top1']:.2f} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Figures


def _series(metrics: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((m["step"], m[key]) for m in metrics if m.get("kind") == kind and m.get(key) is not None
                 and not (isinstance(m[key], float) and math.isnan(m[key])))
    return [p[0] for p in pts], [p[1] for p in pts]


def make_figures(budgets: list[Budget], runs: list[dict], fig_dir: Path, tag: str) -> list[tuple[str, Path]]:
    """One figure per budget (accuracy, mask rate, pseudo-label accuracy over steps) and one of throughput."""
    import matplotlib

    matplotlib.use("Agg")
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for b in budgets:
        path = fig_dir / f"{tag}curves-{b.n}.png"
        _curves_figure(b, path)
        made.append((f"{b.n} labels: accuracy, mask rate, pseudo-label accuracy", path))
    path = fig_dir / f"{tag}throughput.png"
    _throughput_figure(budgets, path)
    made.append(("throughput", path))
    return made


def _curves_figure(b: Budget, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for a in b.arms:
        rs = list(b.by_arm[a].values())
        label, color = arm_name(a), COLORS.get(a)
        curves = [_series(r["metrics"], "eval", "top1") for r in rs]
        for steps, acc in curves:
            axes[0].plot(steps, acc, color=color, alpha=0.35 if len(rs) > 1 else 1.0, lw=1,
                         marker="o" if len(steps) < 30 else None, ms=3, label=None if len(rs) > 1 else label)
        common = set.intersection(*(set(s) for s, _ in curves)) if curves else set()
        if len(rs) > 1 and common:  # the mean over seeds where every seed was evaluated, and their range
            xs = sorted(common)
            ys = np.array([[dict(zip(s, acc))[x] for x in xs] for s, acc in curves])
            axes[0].plot(xs, ys.mean(0), color=color, lw=2, label=f"{label}, mean of {len(rs)} seeds")
            axes[0].fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        for ax, key in ((axes[1], "mask_rate"), (axes[2], "pseudo_acc")):
            for i, r in enumerate(rs):
                s, v = _series(r["metrics"], "train", key)
                if s:
                    ax.plot(s, [100 * x for x in v], color=color, alpha=0.8, lw=1, label=label if i == 0 else None)
    axes[0].set(title=f"EMA-model test accuracy, {b.n} labels", xlabel="step", ylabel="top-1 accuracy (%)")
    axes[1].set(title=f"mask rate (pseudo-labels accepted), {b.n} labels", xlabel="step",
                ylabel="accepted unlabelled images (%)")
    axes[2].set(title=f"accuracy of accepted pseudo-labels, {b.n} labels", xlabel="step",
                ylabel="correct among accepted (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_figure(budgets: list[Budget], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    arms = [a for a in ARMS if any(a in b.by_arm for b in budgets)]
    width = 0.8 / max(len(arms), 1)
    for j, a in enumerate(arms):
        vals = [statistics.mean([r["result"]["steps_per_second"] or 0.0 for r in b.by_arm.get(a, {}).values()]
                                or [0.0]) for b in budgets]
        ax.bar(np.arange(len(budgets)) + j * width, vals, width, label=arm_name(a), color=COLORS.get(a))
    ax.set_xticks(np.arange(len(budgets)) + width * (len(arms) - 1) / 2, [str(b.n) for b in budgets])
    ax.set(title="training throughput (training steps only)", xlabel="labels", ylabel="steps per second")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The report

HOW_TO_READ = (
    "How to read it: accuracies are the EMA model's top-1 on the test set (or the fixed subset the spec names), as "
    "mean ± sample std over the seeds listed. **final** is the last evaluation, at the last step. **median** is the "
    "median of the last 20 evaluations, the statistic the FixMatch paper reports (the heading says how many and how "
    "often where that differs). **best** is the maximum over all evaluations, i.e. chosen on the test set itself: "
    "TorchSSL's headline statistic, optimistically biased; do not compare it with published medians. Within a "
    "labels block the runs are compared on the same seeds only, where split, data, step budget and applied "
    "optimizer steps agree (checksums in each result.json); anything else is listed apart by name. The "
    "*implementation check* asks whether our code reproduces TorchSSL given the same recipe; the *recipe effect* "
    "asks what TorchSSL's recipe changes against the paper's in one implementation. An interval that contains 0 "
    "means no difference was detected at that number of seeds, not that there is none.")


def study_section(runs: list[dict], fig_dir: Path, tag: str) -> list[str]:
    s = runs[0]["spec"]
    evaluated = "the whole test set" if s["eval_subset"] == 0 else f"a fixed subset of {s['eval_subset']} test images"
    sources = sorted({r["result"].get("data_source") or f"cifar10, source kind `{s['data_kind']}`" for r in runs})
    by_n = defaultdict(list)
    for r in runs:
        by_n[r["spec"]["n_labels"]].append(r)
    budgets = [Budget(n, by_n[n]) for n in sorted(by_n)]
    lines = [f"## {s['steps']} steps, B={s['batch_size']}, μ={s['uratio']}, {s['precision']}, evaluated on "
             f"{evaluated}", "", f"Data: {'; '.join(sources)} (pixels sha256 `{s['data_sha256'][:16]}…`).", ""]
    lines += results_table(budgets, median_heading(runs))
    lines += comparison_sections(budgets)
    lines += excluded_sections(budgets)
    lines += ["", "### Settings", ""] + settings_section(runs)
    lines += ["", "### Figures", ""]
    lines += [f"![{title}](figures/{fig.name})" for title, fig in make_figures(budgets, runs, fig_dir, tag)]
    lines += ["", "### Runs", ""] + runs_section(runs) + [""]
    return lines


def write_report(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    flagged = [r for r in runs if r["problems"]]  # damaged or disagreeing files: shown first, never compared
    runs = [r for r in runs if not r["problems"]]
    path = out_dir / "RESULTS.md"
    lines = ["# FixMatch on CIFAR-10: ours against TorchSSL", "",
             "Generated by `python run_all.py --report-only` from the `result.json` and `metrics.jsonl` files "
             "under `runs/`; edit nothing here by hand.", "", *flagged_section(flagged)]
    if not runs:
        lines.append("No finished runs yet.")
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path
    lines += [HOW_TO_READ, ""]
    studies = defaultdict(list)
    for r in runs:
        studies[study_key(r["spec"])].append(r)
    ordered = sorted(studies.values(), key=lambda rs: -len(rs))
    for i, study in enumerate(ordered):
        lines += study_section(study, out_dir / "figures", f"s{i}-" if len(ordered) > 1 else "")
    path.write_text("\n".join(lines) + "\n")
    return path
