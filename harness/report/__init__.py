"""RESULTS.md, figures/ and runs.csv, rebuilt at any time from the files under a results folder, and nothing else.

A run belongs to an arm (implementation and recipe) and a study (every other spec setting but the budget and seed,
so each algorithm has its own). Within a study and budget, arms are compared on the seeds that all of them
finished, and only where split, data, step budget and applied optimizer steps agree; everything else is listed
apart, by name. Studies of different algorithms that share everything but the algorithm and its own settings (a
protocol) are also set side by side. The report opens with the identity check, gives each study's tables with their
figures under them, and ends with settings, patches and the list of runs.
"""
from __future__ import annotations

import re
from pathlib import Path

from contract.results import write_text_atomic
from contract.spec import ALGORITHMS
from harness.report import figures as F
from harness.report import tables as T
from harness.report.identity import identity_section
from harness.report.studies import (COMPARISONS, Cell, algorithm_name, algorithm_of, arm_name, arm_order, budgets_of,
                                    cell, evaluated_on, grouped, load_runs, protocol_key, study_key, window_text)
from harness.verify import flagged_section

HOW_TO_READ = (
    "How to read the accuracy tables: top-1 of the EMA model on the test set (or the fixed subset the spec names), "
    "as mean ± sample std over the seeds listed. **final** is the last evaluation, at the last step. **median** is "
    "the median of the last evaluations, the statistic the FixMatch paper reports over its last 20 (2% of "
    "training); each heading says how many and what share of training it covers here. **best** is the maximum over "
    "all evaluations, i.e. chosen on the test set itself: TorchSSL's headline statistic, optimistically biased; do "
    "not compare it with published medians. Within a labels block the runs are compared on the same seeds only, "
    "where split, data, step budget and applied optimizer steps agree (checksums in each result.json); anything "
    "else is listed apart by name. The *implementation check* asks whether our code reproduces TorchSSL given the "
    "same recipe under each side's own randomness (the identity check above answers the same question bit for bit); "
    "the *recipe effect* asks what TorchSSL's recipe changes against the paper's in one implementation. An interval "
    "that contains 0 means no difference was detected at that number of seeds, not that there is none.")


class Figures:
    """The figures this build writes, each named once; their names are what the report shows."""

    def __init__(self, folder: Path):
        self.folder, self.names = folder, []

    def path(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names.append(name)
        return self.folder / name

    @staticmethod
    def shown(name: str, alt: str, caption: str) -> list[str]:
        return [f"![{alt}](figures/{name})", "", f"*Figure: {caption}*", ""]


def study_section(runs: list[dict], figs: Figures, tag: str) -> list[str]:
    s, algorithm = runs[0]["spec"], algorithm_of(runs[0])
    name = algorithm_name(algorithm)
    sources = sorted({r["result"].get("data_source") or f"cifar10, source kind `{s['data_kind']}`" for r in runs})
    budgets = budgets_of(runs)
    window = window_text(runs)
    lines = [f"## {name}: {s['steps']} steps, B={s['batch_size']}, μ={s['uratio']}, {s['precision']}, evaluated on "
             f"{evaluated_on(s)}", "",
             f"Data: {'; '.join(sources)} (pixels sha256 `{s['data_sha256'][:16]}…`). The median below is the "
             f"{window}.", ""]
    lines += T.results_table(budgets, "median") + [""]
    fig = figs.path(f"{tag}labels.png")
    lines += figs.shown(fig.name, f"{name}: accuracy against labels",
                        F.labels_figure(budgets, algorithm, s, "median20_top1", "median", fig))
    compared = []
    for c in COMPARISONS:
        rows = T.comparison_rows(budgets, c)
        if rows:
            compared.append(c)
            lines += [f"### {c.title[0].upper() + c.title[1:]}: {c.what}", "",
                      "Per-seed differences in top-1 percentage points, on the seeds both finished with matching "
                      "split, data and steps; mean, sample std, n and the 95% Student-t confidence interval of the "
                      "mean.", "", *T.comparison_table(rows), ""]
    forest = F.forest_rows(budgets, "median20_top1")
    if forest:
        fig = figs.path(f"{tag}differences.png")
        lines += figs.shown(fig.name, f"{name}: differences", F.forest_figure(forest, algorithm, "median", fig))
    lines += T.excluded_lines(budgets)
    lines += ["", "### Training curves", ""]
    for b in budgets:
        fig = figs.path(f"{tag}curves-{b.n}.png")
        lines += figs.shown(fig.name, f"{b.n} labels, {name}: curves", F.curves_figure(b, algorithm, s, fig))
    fig_path = figs.folder / f"{tag}cta-rates.png"
    caption = F.cta_rates_figure(budgets, fig_path)
    if caption:
        figs.path(fig_path.name)
        lines += ["### CTAugment's policy", "", *figs.shown(fig_path.name, f"{name}: CTAugment rates", caption)]
    fig_path = figs.folder / f"{tag}throughput.png"
    caption = F.throughput_figure(budgets, fig_path)
    if caption:
        figs.path(fig_path.name)
        lines += ["### Speed", "", *figs.shown(fig_path.name, f"{name}: speed", caption)]
    return lines


def algorithms_section(runs: list[dict], figs: Figures, tag: str) -> list[str]:
    """The table across algorithms of one protocol (runs that differ only in the algorithm and its own settings)."""
    algorithms = sorted({algorithm_of(r) for r in runs}, key=lambda a: list(ALGORITHMS).index(a))
    names = [algorithm_name(a) for a in algorithms]
    s = runs[0]["spec"]
    heading = (f"## {' against '.join(names)}: {s['steps']} steps, B={s['batch_size']}, {s['precision']}, evaluated "
               f"on {evaluated_on(s)}")
    several = [algorithm_name(a) for a in algorithms
               if len({study_key(r["spec"]) for r in runs if algorithm_of(r) == a}) > 1]
    if several:  # which of an algorithm's studies would stand for it is not the report's to choose
        verb = "has" if len(several) == 1 else "each have"
        return [heading, "", f"Not set side by side: {' and '.join(several)} {verb} several studies here (runs that "
                f"differ in the algorithm's own settings); the table across algorithms takes one per algorithm.", ""]
    budgets = budgets_of(runs, key=cell)
    lines = [heading, "",
             f"Each algorithm with its own settings (its section below), on the same splits, pixels and step budget; "
             f"top-1 (%) as mean ± std on the seeds every run of the budget finished with matching split, data and "
             f"steps. The algorithm gap ({names[-1]} − {names[0]}, per seed, then mean [95% CI] (n)) of each "
             f"implementation stands beside its implementation gap (the rows in italics, per algorithm).", "",
             *T.algorithms_table(budgets, algorithms, names), ""]
    forest = []
    for b in budgets:
        for a in sorted({c.arm for c in b.arms}, key=arm_order):
            hi, lo = Cell(algorithms[-1], a), Cell(algorithms[0], a)
            if b.seeds and hi in b.by_arm and lo in b.by_arm:
                forest.append((f"{arm_name(a)}, {b.n} labels", b.compare(hi, lo, "median20_top1")))
    if forest:
        fig = figs.path(f"{tag}algorithm-gap.png")
        lines += figs.shown(fig.name, "algorithm gap", F.forest_figure(
            forest, f"{names[-1]} − {names[0]}", "median", fig, what=f"the {names[-1]} − {names[0]} gap of each arm"))
    lines += T.excluded_lines(budgets)
    return lines + [""]


def write_report(out_dir: Path) -> Path:
    """Rebuild OUT/RESULTS.md, OUT/figures/ and OUT/runs.csv from the result files; returns RESULTS.md's path.
    Every file is written whole or not at all."""
    out_dir = Path(out_dir)
    all_runs = load_runs(out_dir)
    flagged = [r for r in all_runs if r["problems"]]  # damaged or disagreeing files: shown first, never compared
    runs = [r for r in all_runs if not r["problems"]]
    figs = Figures(out_dir / "figures")
    present = [a for a in ALGORITHMS if any(algorithm_of(r) == a for r in runs)] or list(ALGORITHMS)
    references = [name for impl, name in (("torchssl", "TorchSSL"), ("usb", "USB"))
                  if any(r["spec"]["impl"] == impl for r in runs)]
    against = (f"ours against {' and '.join(references)}" if references  # the references that ran
               else "ours, recipe against recipe" if runs else "ours against TorchSSL")
    lines = [f"# {' and '.join(algorithm_name(a) for a in present)} on CIFAR-10: {against}", "",
             "Generated by `python run_all.py --report-only` from the `result.json` and `metrics.jsonl` files under "
             "`runs/` and the identity check under `identity/`; edit nothing here by hand. `runs.csv` has one row "
             "per run; `tensorboard --logdir runs` shows every run's training live.", "", *flagged_section(flagged)]
    identity, shown = identity_section(out_dir, runs, figs.folder)
    figs.names += shown
    lines += identity
    if not runs:
        lines.append("No finished runs yet.")
    else:
        lines += [HOW_TO_READ, ""]
        for group in grouped(runs, lambda r: protocol_key(r["spec"])):
            if len({algorithm_of(r) for r in group}) > 1:
                lines += algorithms_section(group, figs, tag="")
        studies = sorted(grouped(runs, lambda r: study_key(r["spec"])),
                         key=lambda rs: (arm_order(Cell(algorithm_of(rs[0]), cell(rs[0]).arm))[0], -len(rs)))
        per_algorithm = {}
        for study in studies:
            per_algorithm[algorithm_of(study[0])] = per_algorithm.get(algorithm_of(study[0]), 0) + 1
        tail = []
        for i, study in enumerate(studies):
            algorithm = algorithm_of(study[0])
            # figure names never collide: by algorithm, and by study where an algorithm has several
            tag = "" if len(studies) == 1 else f"{algorithm}-" + (f"s{i}-" if per_algorithm[algorithm] > 1 else "")
            lines += study_section(study, figs, tag)
            tail += [f"### {algorithm_name(algorithm)}: {study[0]['spec']['steps']} steps", "",
                     *T.settings_tables(study), ""]
        lines += ["## Settings, machines and patches", "", *tail, "## Runs", "", *T.runs_table(runs), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    T.write_runs_csv(all_runs, out_dir / "runs.csv")
    path = out_dir / "RESULTS.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    remove_stale_figures(figs.folder, set(figs.names))
    return path


STALE_FIGURE = re.compile(rf"(({'|'.join(ALGORITHMS)})-)?(s\d+-)?(curves-\d+|throughput|labels|differences|"
                          rf"algorithm-gap|cta-rates)\.png|identity-[\w-]+\.png")


def remove_stale_figures(fig_dir: Path, shown: set[str]) -> None:
    """Delete the figures an earlier build wrote under names this report no longer shows (a study merged or gone),
    so that figures/ matches RESULTS.md; files of other names are left alone."""
    for f in fig_dir.glob("*.png"):
        if STALE_FIGURE.fullmatch(f.name) and f.name not in shown:
            f.unlink()
