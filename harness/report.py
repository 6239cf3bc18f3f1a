"""RESULTS.md and figures/, rebuilt at any time from the result files under a results folder, and nothing else."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from harness.verify import flagged_section, load_run

IMPL_NAMES = {"own": "ours (own_impl)", "torchssl": "TorchSSL"}
# Spec fields that differ between the runs of one comparison by design; every other field defines the group.
PER_RUN_FIELDS = ("impl", "n_labels", "seed", "split_sha256")
CHECKED = ("split_sha256", "data_sha256", "steps")  # what two implementations must share to be compared


def load_runs(out_dir: Path) -> list[dict]:
    """Every finished run under out_dir/runs: its spec, result and metrics."""
    runs = []
    for run_dir in sorted((Path(out_dir) / "runs").glob("*")):
        run = load_run(run_dir)  # None without result.json; else checked, with its "problems" (harness/verify.py)
        if run is not None:
            runs.append(run)
    return runs


def group_key(spec: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in spec.items() if k not in PER_RUN_FIELDS))


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def pair_check(runs: list[dict]) -> dict[tuple[int, int], list[str]]:
    """For each (budget, seed) run by several implementations: the checked fields on which they disagree."""
    by_pair = defaultdict(list)
    for r in runs:
        by_pair[(r["spec"]["n_labels"], r["spec"]["seed"])].append(r)
    problems = {}
    for key, rs in by_pair.items():
        if len(rs) < 2:
            continue
        bad = [f for f in CHECKED if len({r["result"].get(f) for r in rs}) > 1]
        problems[key] = bad
    return problems


def short_version(version) -> str:
    """The first 12 digits of a commit, keeping the -dirty mark that says the tree had uncommitted changes."""
    version = str(version)
    return version[:12] + ("-dirty" if version.endswith("-dirty") else "")


def _mean_or_dash(values: list) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.2f}" if values else "–"


def impls_in(runs: list[dict]) -> list[str]:
    """The implementations among `runs`, in IMPL_NAMES order (ours first)."""
    return sorted({r["spec"]["impl"] for r in runs}, key=lambda i: list(IMPL_NAMES).index(i))


def fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def results_table(runs: list[dict], checks: dict) -> list[str]:
    impls = impls_in(runs)
    lines = ["| labels | implementation | final top-1 (%) | median of last 20 (%) | best top-1 (%), test-selected "
             "| steps | wall time / run | steps/s | same split, data, steps |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for n in sorted({r["spec"]["n_labels"] for r in runs}):
        for impl in impls:
            mine = [r for r in runs if r["spec"]["n_labels"] == n and r["spec"]["impl"] == impl]
            if not mine:
                continue
            # A seed whose implementations disagree on split, data or step budget is excluded from the comparison.
            ok = [r for r in mine if not checks.get((n, r["spec"]["seed"]))]
            excluded = len(mine) - len(ok)
            res = [r["result"] for r in ok]
            paired = [checks.get((n, r["spec"]["seed"])) is not None for r in mine]
            if excluded:
                check = f"**MISMATCH on {excluded} seed(s), excluded**"
            elif len(impls) > 1 and all(paired):
                check = "yes"
            else:
                check = "unpaired"
            name = IMPL_NAMES.get(impl, impl)
            if not res:
                lines.append(f"| {n} | {name} | – | – | – | – | – | – | {check} |")
                continue
            steps = ", ".join(str(x) for x in sorted({x["steps"] for x in res}))
            lines.append(
                f"| {n} | {name} | {mean_std([x['final_top1'] for x in res])} "
                f"| {mean_std([x['median20_top1'] for x in res])} | {mean_std([x['best_top1'] for x in res])} "
                f"| {steps} | {fmt_seconds(statistics.mean(x['wall_seconds'] for x in res))} "
                f"| {_mean_or_dash([x.get('steps_per_second') for x in res])} | {check} |")
    return lines


def mismatch_section(runs: list[dict], checks: dict) -> list[str]:
    bad = {k: v for k, v in checks.items() if v}
    if not bad:
        return []
    lines = ["", "## ⚠ MISMATCHED RUNS (excluded from the table)", ""]
    for (n, seed), fields in sorted(bad.items()):
        lines.append(f"- **{n} labels, seed {seed}: the implementations differ in {', '.join(fields)}**")
        for r in runs:
            if (r["spec"]["n_labels"], r["spec"]["seed"]) == (n, seed):
                vals = ", ".join(f"{f}={str(r['result'].get(f))[:16]}" for f in fields)
                lines.append(f"  - {r['spec']['impl']}: {vals} ({r['dir'].name})")
    return lines


def settings_section(runs: list[dict]) -> list[str]:
    spec = runs[0]["spec"]
    lines = ["| setting | value (both implementations, from the run spec) |", "|---|---|"]
    for k, v in spec.items():
        if k not in PER_RUN_FIELDS:
            lines.append(f"| {k} | {v} |")
    impls = impls_in(runs)
    per_impl = {i: next(r["result"] for r in runs if r["spec"]["impl"] == i) for i in impls}
    keys = sorted({k for res in per_impl.values() for k in res.get("impl_settings", {})})
    if keys:
        lines += ["", "How each implementation realises it (from each result's `impl_settings`; "
                  "**bold** rows differ):", "",
                  "| | " + " | ".join(IMPL_NAMES.get(i, i) for i in impls) + " |",
                  "|---|" + "---|" * len(impls)]
        for k in keys:
            vals = [str(per_impl[i].get("impl_settings", {}).get(k, "–")) for i in impls]
            name = f"**{k}**" if len(set(vals)) > 1 else k
            lines.append(f"| {name} | " + " | ".join(v.replace("|", "/") for v in vals) + " |")
    env_rows = []
    for i in impls:
        res = per_impl[i]
        env_rows.append(f"| {IMPL_NAMES.get(i, i)} | {res.get('device')} | {res.get('device_name', '–')} "
                        f"| {res.get('torch_version')} | {short_version(res.get('code_version'))} "
                        f"| {str(res.get('torchssl_commit', '–'))[:12]} | {len(res.get('patches', []))} |")
    lines += ["", "| implementation | device | machine | torch | our code version | TorchSSL commit "
              "| run-time patches |", "|---|---|---|---|---|---|---|", *env_rows]
    patches = [p for i in impls for p in per_impl[i].get("patches", [])]
    if patches:
        lines += ["", "Run-time patches applied to TorchSSL (its files are never edited):", ""]
        for p in patches:
            lines.append(f"- `{p['name']}` ({p.get('target', '')}): {p['why']}" if isinstance(p, dict) else f"- {p}")
    return lines


def _series(metrics: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = sorted((m["step"], m[key]) for m in metrics if m.get("kind") == kind and m.get(key) is not None
                 and not (isinstance(m[key], float) and math.isnan(m[key])))
    return [p[0] for p in pts], [p[1] for p in pts]


COLORS = {"own": "tab:blue", "torchssl": "tab:orange"}


def make_figures(runs: list[dict], fig_dir: Path, tag: str) -> list[tuple[str, Path]]:
    """One figure per budget (accuracy, mask rate, pseudo-label accuracy over steps) and one of throughput."""
    import matplotlib

    matplotlib.use("Agg")
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for n in sorted({r["spec"]["n_labels"] for r in runs}):
        path = fig_dir / f"{tag}curves-{n}.png"
        _curves_figure([r for r in runs if r["spec"]["n_labels"] == n], n, path)
        made.append((f"{n} labels: accuracy, mask rate, pseudo-label accuracy", path))
    path = fig_dir / f"{tag}throughput.png"
    _throughput_figure(runs, path)
    made.append(("throughput", path))
    return made


def _curves_figure(runs: list[dict], n: int, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for impl in impls_in(runs):
        rs = [r for r in runs if r["spec"]["impl"] == impl]
        label, color = IMPL_NAMES.get(impl, impl), COLORS.get(impl)
        curves = [_series(r["metrics"], "eval", "top1") for r in rs]
        for steps, acc in curves:
            axes[0].plot(steps, acc, color=color, alpha=0.35 if len(rs) > 1 else 1.0, lw=1,
                         marker="o" if len(steps) < 30 else None, ms=3, label=None if len(rs) > 1 else label)
        common = set.intersection(*(set(s) for s, _ in curves)) if curves else set()
        if len(rs) > 1 and common:  # the mean over seeds where every seed was evaluated, and their range
            xs = sorted(common)
            ys = np.array([[dict(zip(s, a))[x] for x in xs] for s, a in curves])
            axes[0].plot(xs, ys.mean(0), color=color, lw=2, label=f"{label}, mean of {len(rs)} seeds")
            axes[0].fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.15)
        for ax, key in ((axes[1], "mask_rate"), (axes[2], "pseudo_acc")):
            for i, r in enumerate(rs):
                s, v = _series(r["metrics"], "train", key)
                if s:
                    ax.plot(s, [100 * x for x in v], color=color, alpha=0.8, lw=1, label=label if i == 0 else None)
    axes[0].set(title=f"EMA-model test accuracy, {n} labels", xlabel="step", ylabel="top-1 accuracy (%)")
    axes[1].set(title=f"mask rate (pseudo-labels accepted), {n} labels", xlabel="step",
                ylabel="accepted unlabelled images (%)")
    axes[2].set(title=f"accuracy of accepted pseudo-labels, {n} labels", xlabel="step",
                ylabel="correct among accepted (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput_figure(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted({r["spec"]["n_labels"] for r in runs})
    impls = impls_in(runs)
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        vals = [statistics.mean([r["result"]["steps_per_second"] or 0.0 for r in runs
                                 if r["spec"]["impl"] == impl and r["spec"]["n_labels"] == n] or [0.0])
                for n in budgets]
        ax.bar(np.arange(len(budgets)) + j * width, vals, width, label=IMPL_NAMES.get(impl, impl),
               color=COLORS.get(impl))
    ax.set_xticks(np.arange(len(budgets)) + width * (len(impls) - 1) / 2, [str(b) for b in budgets])
    ax.set(title="training throughput (training steps only; evaluation and checkpoints excluded)", xlabel="labels",
           ylabel="steps per second")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    lines += [
        "How to read it: accuracies are the EMA model's top-1 on the test set (or the fixed subset the spec names), "
        "as mean ± sample std over seeds (n seeds). **final** is the last evaluation, at the last step. "
        "**median of last 20** is the median of the last 20 evaluations, the statistic the FixMatch paper reports. "
        "**best** is the maximum over all evaluations, i.e. chosen on the test set itself: it is TorchSSL's "
        "headline statistic and is optimistically biased; do not compare it with published medians.", ""]
    groups = defaultdict(list)
    for r in runs:
        groups[group_key(r["spec"])].append(r)
    for gi, (_, grs) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        s = grs[0]["spec"]
        tag = f"g{gi}-" if len(groups) > 1 else ""
        checks = pair_check(grs)
        evaluated = "the whole test set" if s["eval_subset"] == 0 else f"a fixed subset of {s['eval_subset']} test images"
        lines += [f"## {s['steps']} steps, B={s['batch_size']}, μ={s['uratio']}, {s['precision']}, eval on {evaluated}",
                  "", f"Data: cifar10, source kind `{s['data_kind']}`, "
                  f"pixels sha256 `{s['data_sha256'][:16]}…`.", ""]
        lines += results_table(grs, checks)
        lines += mismatch_section(grs, checks)
        lines += ["", "### Settings", ""] + settings_section(grs)
        lines += ["", "### Figures", ""]
        for title, fig in make_figures(grs, out_dir / "figures", tag):
            lines.append(f"![{title}](figures/{fig.name})")
        lines += ["", "### Runs", "", "| run | impl | labels | seed | split sha256 | steps | final top-1 (%) |",
                  "|---|---|---:|---:|---|---:|---:|"]
        for r in sorted(grs, key=lambda r: (r["spec"]["n_labels"], r["spec"]["seed"], r["spec"]["impl"])):
            res = r["result"]
            lines.append(f"| `{r['dir'].name}` | {r['spec']['impl']} | {r['spec']['n_labels']} | {r['spec']['seed']} "
                         f"| `{res['split_sha256'][:12]}` | {res['steps']} | {res['final_top1']:.2f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path
