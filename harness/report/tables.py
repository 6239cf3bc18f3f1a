"""The report's tables, each a pandas DataFrame rendered to markdown with tabulate, and runs.csv (one row per run)."""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from contract.results import write_atomic
from harness.report.studies import (ARMS, COMPARISONS, PER_RUN_FIELDS, STATISTICS, Budget, Cell, arm, arm_name,
                                    arm_order)
from harness.stats import Paired


def markdown(df: pd.DataFrame, right: tuple[str, ...] = ()) -> list[str]:
    """A DataFrame as markdown lines; columns named in `right` right-aligned (numbers), the rest left."""
    align = ["right" if c in right else "left" for c in df.columns]
    return df.to_markdown(index=False, colalign=align, disable_numparse=True).splitlines()


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


def diff_text(p: Paired | None) -> str:
    if p is None:
        return "no paired seeds"
    if p.low is None:
        return f"{p.mean:+.2f} (n=1)"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}] (n={p.n})"


def results_table(budgets: list[Budget], median_title: str) -> list[str]:
    rows = []
    for b in budgets:
        for a in b.arms:
            res = b.results(a)
            row = {"labels": b.n, "run": arm_name(a), "seeds": ", ".join(map(str, b.seeds)) or "–"}
            if not res:
                rows.append(row)
                continue
            sps = [r["steps_per_second"] for r in res if r.get("steps_per_second")]
            row.update({
                "final top-1 (%)": mean_std([r["final_top1"] for r in res]),
                f"{median_title} (%)": mean_std([r["median20_top1"] for r in res]),
                "best top-1 (%), test-selected": mean_std([r["best_top1"] for r in res]),
                "steps": ", ".join(sorted({str(r.get("steps")) for r in res})),
                "optimizer steps applied": ", ".join(sorted({str(r.get("optimizer_steps")) for r in res})),
                "wall time / run": fmt_seconds(statistics.mean(r["wall_seconds"] for r in res)),
                "steps/s": f"{statistics.mean(sps):.2f}" if sps else "–"})
            rows.append(row)
    df = pd.DataFrame(rows).fillna("–")
    return markdown(df, right=("labels", "steps", "optimizer steps applied", "wall time / run", "steps/s"))


def comparison_rows(budgets: list[Budget], comparison) -> list[dict]:
    """Per budget and statistic: the paired differences of one comparison (empty if no budget has both arms)."""
    rows = []
    for b in budgets:
        if comparison.a not in b.by_arm or comparison.b not in b.by_arm:
            continue
        for key, name in STATISTICS:
            p = b.compare(comparison.a, comparison.b, key)
            rows.append({"labels": b.n, "statistic": name, "paired": p, "seeds": b.seeds})
    return rows


def comparison_table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        p = r["paired"]
        if p is None:
            out.append({"labels": r["labels"], "statistic": r["statistic"], "per seed (seed: a − b)": "no paired seeds",
                        "mean": "–", "std": "–", "n": 0, "95% CI": "–", "reading": ""})
            continue
        out.append({"labels": r["labels"], "statistic": r["statistic"],
                    "per seed (seed: a − b)": ", ".join(f"{s}: {d:+.2f}" for s, d in zip(r["seeds"], p.diffs)),
                    "mean": f"{p.mean:+.2f}", "std": f"{p.sd:.2f}" if p.sd is not None else "–", "n": p.n,
                    "95% CI": f"[{p.low:+.2f}, {p.high:+.2f}]" if p.low is not None else "–",
                    "reading": p.verdict()})
    return markdown(pd.DataFrame(out), right=("labels", "mean", "std", "n"))


def algorithms_table(budgets: list[Budget], algorithms: list[str], names: list[str]) -> list[str]:
    """The table across algorithms: each arm under each algorithm, the algorithm gap (last minus first algorithm)
    per arm, and each comparison (the implementation gap) per algorithm."""
    first, last = algorithms[0], algorithms[-1]
    gap = f"{names[-1]} − {names[0]}"
    rows = []
    for b in budgets:
        seeds = ", ".join(map(str, b.seeds)) or "–"
        for a in [a for a in ARMS if any(Cell(alg, a) in b.by_arm for alg in algorithms)]:
            for key, name in STATISTICS:
                row = {"labels": b.n, "run": arm_name(a), "seeds": seeds, "statistic": name}
                for alg, title in zip(algorithms, names):
                    row[title] = mean_std([r[key] for r in b.results(Cell(alg, a))]) if (
                        Cell(alg, a) in b.by_arm and b.seeds) else "–"
                row[gap] = diff_text(b.compare(Cell(last, a), Cell(first, a), key)) if b.seeds else "no paired seeds"
                rows.append(row)
        for c in COMPARISONS:
            if not all(Cell(alg, c.a) in b.by_arm and Cell(alg, c.b) in b.by_arm for alg in algorithms):
                continue
            for key, name in STATISTICS:
                row = {"labels": b.n, "run": f"*{c.title}*: {arm_name(c.a)} − {arm_name(c.b)}", "seeds": seeds,
                       "statistic": name}
                for alg, title in zip(algorithms, names):
                    row[title] = diff_text(b.compare(Cell(alg, c.a), Cell(alg, c.b), key))
                row[gap] = ""
                rows.append(row)
    return markdown(pd.DataFrame(rows), right=("labels",))


def excluded_lines(budgets: list[Budget]) -> list[str]:
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


def settings_tables(runs: list[dict]) -> list[str]:
    """The study's spec settings, how each arm realises them (impl_settings; bold rows differ), the machines and
    code versions, and TorchSSL's run-time patches."""
    spec = runs[0]["spec"]
    lines = markdown(pd.DataFrame([{"setting": k, "value (every run of this study, from the run spec)": str(v)}
                                   for k, v in spec.items() if k not in PER_RUN_FIELDS and v is not None]))
    first = {}
    for r in sorted(runs, key=lambda r: r["spec"]["seed"]):
        first.setdefault(arm(r), r["result"])
    arms = sorted(first, key=arm_order)
    keys = sorted({k for res in first.values() for k in res.get("impl_settings", {})})
    if keys:
        rows = []
        for k in keys:
            vals = [str(first[a].get("impl_settings", {}).get(k, "–")).replace("|", "/") for a in arms]
            rows.append({"": f"**{k}**" if len(set(vals)) > 1 else k, **dict(zip(map(arm_name, arms), vals))})
        lines += ["", "How each run realises it (from each result's `impl_settings`; **bold** rows differ; "
                  "third_party/torchssl/README.md and third_party/usb/README.md say why TorchSSL's and USB's "
                  "differ):", "", *markdown(pd.DataFrame(rows))]
    machines = [{"run": arm_name(a), "device": first[a].get("device"), "machine": first[a].get("device_name", "–"),
                 "torch": first[a].get("torch_version"),
                 "our code version": short_version(first[a].get("code_version")),
                 "reference commit": str(first[a].get("torchssl_commit") or first[a].get("usb_commit") or "–")[:12],
                 "run-time patches": len(first[a].get("patches", []))} for a in arms]
    lines += ["", *markdown(pd.DataFrame(machines), right=("run-time patches",))]
    for a in arms:
        patches = first[a].get("patches", [])
        if patches:
            lines += ["", f"Run-time patches applied to {arm_name(a)} (its files are never edited):", ""]
            lines += [f"- `{p['name']}` ({p.get('target', '')}): {p['why']}" for p in patches]
    return lines


def runs_table(runs: list[dict]) -> list[str]:
    rows = []
    for r in sorted(runs, key=lambda r: (r["spec"]["n_labels"], r["spec"]["seed"], arm_order(arm(r)))):
        res = r["result"]
        rows.append({"run": f"`{r['dir'].name}`", "labels": r["spec"]["n_labels"], "seed": r["spec"]["seed"],
                     "split sha256": f"`{res['split_sha256'][:12]}`", "steps": res["steps"],
                     "optimizer steps": res.get("optimizer_steps"),
                     "resumed at": ", ".join(map(str, res.get("resumed_at") or [])) or "never stopped",
                     "final top-1 (%)": f"{res['final_top1']:.2f}"})
    return markdown(pd.DataFrame(rows), right=("labels", "seed", "steps", "optimizer steps", "final top-1 (%)"))


RESULT_COLUMNS = ("final_top1", "median20_top1", "median_window", "best_top1", "final_top5", "final_loss", "steps",
                  "optimizer_steps", "steps_per_second", "train_seconds", "wall_seconds", "split_sha256",
                  "data_sha256", "data_kind", "param_count", "device", "device_name", "torch_version",
                  "code_version", "torchssl_commit", "usb_commit", "launcher")


def write_runs_csv(runs: list[dict], path: Path) -> Path:
    """One row per run: its folder, every spec field, every statistic and checksum, and whether its files check
    out (runs with problems are kept, flagged, for whoever analyses them)."""
    rows = []
    for r in runs:
        res = r["result"] or {}
        rows.append({"run": r["dir"].name, "files_check_out": not r["problems"], **(r["spec"] or {}),
                     **{k: res.get(k) for k in RESULT_COLUMNS},
                     "resumed_at": " ".join(map(str, res.get("resumed_at") or []))})
    write_atomic(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    return path
