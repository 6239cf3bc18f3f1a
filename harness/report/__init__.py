"""RESULTS.md and figures/, rebuilt at any time from the result files under a results folder, and nothing else.

A run belongs to an arm (implementation and recipe: ours with the paper's recipe, ours with TorchSSL's, TorchSSL)
and a study (every other spec setting but the budget and seed, so each algorithm has its own). Within a study and
budget, the arms are compared on the seeds that all of them finished, and only where their split, data, step budget
and applied optimizer steps agree; everything else is listed apart, by name. Studies of different algorithms that
share everything but the algorithm and its own defaults (a protocol) are also set side by side, arm by arm, on the
seeds every one of their runs finished.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from contract.spec import ALGORITHM_SETTINGS, ALGORITHMS
from harness.plan import ALGORITHM_DEFAULTS
from harness.report.identity import identity_section
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
ALGORITHM_NAMES = {"fixmatch": "FixMatch", "mixmatch": "MixMatch"}
# The settings an algorithm brings with it (its own, and the defaults it sets, such as mu and lambda_u): runs of
# different algorithms that differ only in these (and in the algorithm) follow one protocol and are set side by side.
ALGORITHM_FIELDS = ("algorithm", *sorted({k for d in ALGORITHM_DEFAULTS.values() for k in d}
                                         | {k for names in ALGORITHM_SETTINGS.values() for k in names}))
# The training statistics each algorithm's figure shows beside the accuracy: (name, scale, title, y label).
FIGURE_PANELS = {
    "fixmatch": (("mask_rate", 100, "mask rate (pseudo-labels accepted)", "accepted unlabelled images (%)"),
                 ("pseudo_acc", 100, "accuracy of accepted pseudo-labels", "correct among accepted (%)")),
    "mixmatch": (("lambda_u", 1, "λu(t), the ramped weight of L_U", "λu"),
                 ("loss_u", 1, "L_U, squared error on the mixed unlabelled rows", "L_U"),
                 ("guess_acc", 100, "accuracy of the guessed labels", "argmax of the guess correct (%)")),
}


def arm(run: dict) -> tuple[str, str]:
    return run["spec"]["impl"], run["spec"].get("recipe", "paper")


def arm_name(a: tuple) -> str:
    """An arm's name; a cell's (algorithm, implementation, recipe) is its algorithm's name and its arm's."""
    if len(a) == 3:
        return f"{ALGORITHM_NAMES.get(a[0], a[0])}, {arm_name(a[1:])}"
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
    """The settings runs of one study share. A None field does not apply to the run (RunSpec.hash leaves it out
    too), so a spec written before that field existed belongs to the same study."""
    return tuple(sorted((k, v) for k, v in spec.items() if k not in PER_RUN_FIELDS and v is not None))


def protocol_key(spec: dict) -> tuple:
    """A study's key without its algorithm and the settings that come with an algorithm."""
    return tuple(sorted((k, v) for k, v in spec.items()
                        if k not in PER_RUN_FIELDS + ALGORITHM_FIELDS and v is not None))


def algorithm_of(run: dict) -> str:
    return run["spec"].get("algorithm", "fixmatch")


def algorithm_name(algorithm: str) -> str:
    return ALGORITHM_NAMES.get(algorithm, algorithm)


def cell(run: dict) -> tuple[str, str, str]:
    """(algorithm, implementation, recipe): a run's place in the table across algorithms."""
    return (algorithm_of(run), *arm(run))


def arm_order(a: tuple) -> tuple:
    """Arms in ARMS order; cells by algorithm (ALGORITHMS order), then arm."""
    alg, a = (a[0], a[1:]) if len(a) == 3 else ("", a)
    return (list(ALGORITHMS).index(alg) if alg in ALGORITHMS else -1,
            list(ARMS).index(a) if a in ARMS else len(ARMS), a)


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
    split, data and steps (`paired`), those it did not (`unpaired`), and the mismatches. key: a run's arm (or, across
    algorithms, its cell)."""

    def __init__(self, n: int, runs: list[dict], key=arm):
        self.n, self.key = n, key
        self.by_arm: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for r in runs:
            self.by_arm[key(r)][r["spec"]["seed"]] = r
        self.arms = sorted(self.by_arm, key=arm_order)
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
            lines.append(f"- {b.n} labels, seed {r['spec']['seed']}, {arm_name(b.key(r))}: final top-1 "
                         f"{r['result']['final_top1']:.2f} (`{r['dir'].name}`)")
    return lines


def settings_section(runs: list[dict]) -> list[str]:
    spec = runs[0]["spec"]
    lines = ["| setting | value (every run of this study, from the run spec) |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in spec.items() if k not in PER_RUN_FIELDS and v is not None]
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
    """One figure per budget (accuracy, and the algorithm's FIGURE_PANELS over steps) and one of throughput."""
    import matplotlib

    matplotlib.use("Agg")
    fig_dir.mkdir(parents=True, exist_ok=True)
    algorithm = algorithm_of(runs[0])
    panels = FIGURE_PANELS.get(algorithm, ())
    made = []
    for b in budgets:
        path = fig_dir / f"{tag}curves-{b.n}.png"
        _curves_figure(b, path, panels)
        made.append((f"{b.n} labels, {algorithm_name(algorithm)}: accuracy, "
                     + ", ".join(title for _, _, title, _ in panels), path))
    path = fig_dir / f"{tag}throughput.png"
    _throughput_figure(budgets, path)
    made.append(("throughput", path))
    return made


def _curves_figure(b: Budget, path: Path, panels: tuple) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 * (1 + len(panels)), 4), squeeze=False)
    axes = axes[0]
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
        for ax, (key, scale, _, _) in zip(axes[1:], panels):
            for i, r in enumerate(rs):
                s, v = _series(r["metrics"], "train", key)
                if s:
                    ax.plot(s, [scale * x for x in v], color=color, alpha=0.8, lw=1, label=label if i == 0 else None)
    axes[0].set(title=f"EMA-model test accuracy, {b.n} labels", xlabel="step", ylabel="top-1 accuracy (%)")
    for ax, (_, _, title, ylabel) in zip(axes[1:], panels):
        ax.set(title=f"{title}, {b.n} labels", xlabel="step", ylabel=ylabel)
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
    lines = [f"## {algorithm_name(algorithm_of(runs[0]))}: {s['steps']} steps, B={s['batch_size']}, μ={s['uratio']}, "
             f"{s['precision']}, evaluated on {evaluated}", "",
             f"Data: {'; '.join(sources)} (pixels sha256 `{s['data_sha256'][:16]}…`).", ""]
    lines += results_table(budgets, median_heading(runs))
    lines += comparison_sections(budgets)
    lines += excluded_sections(budgets)
    lines += ["", "### Settings", ""] + settings_section(runs)
    lines += ["", "### Figures", ""]
    lines += [f"![{title}](figures/{fig.name})" for title, fig in make_figures(budgets, runs, fig_dir, tag)]
    lines += ["", "### Runs", ""] + runs_section(runs) + [""]
    return lines


def diff_text(p: Paired | None) -> str:
    if p is None:
        return "no paired seeds"
    if p.low is None:
        return f"{p.mean:+.2f} (n=1)"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}] (n={p.n})"


def algorithms_table(b: Budget, algorithms: list[str]) -> list[str]:
    """One budget's rows of the table across algorithms: each arm under each algorithm, the algorithm gap
    (last minus first algorithm) per arm, and each study comparison (the implementation gap) per algorithm."""
    first, last = algorithms[0], algorithms[-1]
    seeds = ", ".join(map(str, b.seeds)) or "–"
    lines = []
    for a in [a for a in ARMS if any((alg, *a) in b.by_arm for alg in algorithms)]:
        for key, name in STATISTICS:
            cells = [mean_std([r[key] for r in b.results((alg, *a))]) if (alg, *a) in b.by_arm and b.seeds
                     else "–" for alg in algorithms]
            gap = diff_text(b.compare((last, *a), (first, *a), key)) if b.seeds else "no paired seeds"
            lines.append(f"| {b.n} | {arm_name(a)} | {seeds} | {name} | " + " | ".join(cells) + f" | {gap} |")
    for title, x, y, _ in COMPARISONS:
        if not all((alg, *x) in b.by_arm and (alg, *y) in b.by_arm for alg in algorithms):
            continue
        for key, name in STATISTICS:
            cells = [diff_text(b.compare((alg, *x), (alg, *y), key)) for alg in algorithms]
            lines.append(f"| {b.n} | *{title}*: {arm_name(x)} − {arm_name(y)} | {seeds} | {name} | "
                         + " | ".join(cells) + " | |")
    return lines


def algorithms_section(runs: list[dict]) -> list[str]:
    """The table across algorithms of one protocol (runs that differ only in the algorithm and its own settings)."""
    algorithms = sorted({algorithm_of(r) for r in runs}, key=lambda a: arm_order((a, "", ""))[0])
    names = [algorithm_name(a) for a in algorithms]
    s = runs[0]["spec"]
    evaluated = "the whole test set" if s["eval_subset"] == 0 else f"a fixed subset of {s['eval_subset']} test images"
    heading = f"## {' against '.join(names)}: {s['steps']} steps, B={s['batch_size']}, {s['precision']}, evaluated on "
    several = [algorithm_name(a) for a in algorithms
               if len({study_key(r["spec"]) for r in runs if algorithm_of(r) == a}) > 1]
    if several:  # which of an algorithm's studies would stand for it is not the report's to choose
        verb = "has" if len(several) == 1 else "each have"
        return [heading + evaluated, "", f"Not set side by side: {' and '.join(several)} {verb} several studies here "
                f"(runs that differ in the algorithm's own settings); the table across algorithms takes one per "
                f"algorithm.", ""]
    by_n = defaultdict(list)
    for r in runs:
        by_n[r["spec"]["n_labels"]].append(r)
    budgets = [Budget(n, by_n[n], key=cell) for n in sorted(by_n)]
    lines = [heading + evaluated, "",
             f"Each algorithm with its own settings (its section below), on the same splits, pixels and step budget; "
             f"top-1 (%) as mean ± std on the seeds every run of the budget finished with matching split, data and "
             f"steps. The algorithm gap ({names[-1]} − {names[0]}, per seed, then mean [95% CI] (n)) of each "
             f"implementation stands beside its implementation gap (the rows in italics, per algorithm).", "",
             "| labels | run | seeds | statistic | " + " | ".join(names) + f" | {names[-1]} − {names[0]} |",
             "|---:|---|---|---|" + "---:|" * len(names) + "---|"]
    for b in budgets:
        lines += algorithms_table(b, algorithms)
    lines += excluded_sections(budgets)
    return lines + [""]


def write_report(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    flagged = [r for r in runs if r["problems"]]  # damaged or disagreeing files: shown first, never compared
    runs = [r for r in runs if not r["problems"]]
    path = out_dir / "RESULTS.md"
    present = [a for a in ALGORITHMS if any(algorithm_of(r) == a for r in runs)] or list(ALGORITHMS)
    lines = [f"# {' and '.join(algorithm_name(a) for a in present)} on CIFAR-10: ours against TorchSSL", "",
             "Generated by `python run_all.py --report-only` from the `result.json` and `metrics.jsonl` files "
             "under `runs/` and `identity/`; edit nothing here by hand.", "", *flagged_section(flagged)]
    identity, _ = identity_section(out_dir, runs, out_dir / "figures")
    lines += identity
    if not runs:
        lines.append("No finished runs yet.")
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path
    lines += [HOW_TO_READ, ""]
    protocols = defaultdict(list)
    for r in runs:
        protocols[protocol_key(r["spec"])].append(r)
    for group in protocols.values():
        if len({algorithm_of(r) for r in group}) > 1:
            lines += algorithms_section(group)
    studies = defaultdict(list)
    for r in runs:
        studies[study_key(r["spec"])].append(r)
    ordered = sorted(studies.values(), key=lambda rs: (arm_order((algorithm_of(rs[0]), "", ""))[0], -len(rs)))
    per_algorithm = defaultdict(int)
    for study in ordered:
        per_algorithm[algorithm_of(study[0])] += 1
    for i, study in enumerate(ordered):
        algorithm = algorithm_of(study[0])
        # figure names never collide: by algorithm, and by study where an algorithm has several
        tag = "" if len(ordered) == 1 else f"{algorithm}-" + (f"s{i}-" if per_algorithm[algorithm] > 1 else "")
        lines += study_section(study, out_dir / "figures", tag)
    path.write_text("\n".join(lines) + "\n")
    remove_stale_figures(out_dir / "figures", set(re.findall(r"\(figures/([^)]+)\)", "\n".join(lines))))
    return path


STALE_FIGURE = re.compile(r"((fixmatch|mixmatch)-)?(s\d+-)?(curves-\d+|throughput)\.png|identity-\w+\.png")


def remove_stale_figures(fig_dir: Path, shown: set[str]) -> None:
    """Delete the figures an earlier build wrote under names this report no longer shows (a study merged or gone),
    so that figures/ matches RESULTS.md; files of other names are left alone."""
    for f in fig_dir.glob("*.png"):
        if STALE_FIGURE.fullmatch(f.name) and f.name not in shown:
            f.unlink()
