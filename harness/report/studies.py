"""How the report groups runs: arms (implementation and recipe), studies (every setting but budget and seed),
protocols (a study without its algorithm's own settings), and, per study and budget, the seeds every arm finished
with matching checksums. Reads run dicts (harness/verify.py load_run) and the contract only."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, NamedTuple

from contract.spec import ALGORITHM_DEFAULTS, ALGORITHM_SETTINGS, ALGORITHMS
from harness.stats import Paired, paired
from harness.verify import load_run


class Arm(NamedTuple):
    impl: str
    recipe: str


class Cell(NamedTuple):
    """An arm under an algorithm: a row of the table across algorithms."""

    algorithm: str
    arm: Arm


OURS_PAPER, OURS_CTA = Arm("own", "paper"), Arm("own", "paper-cta")
OURS_TORCHSSL, OURS_USB = Arm("own", "torchssl"), Arm("own", "usb")
TORCHSSL, USB = Arm("torchssl", "torchssl"), Arm("usb", "usb")
ARMS = {OURS_PAPER: "ours (paper recipe)", OURS_CTA: "ours (paper recipe, CTAugment)",
        OURS_TORCHSSL: "ours (TorchSSL recipe)", OURS_USB: "ours (USB recipe)", TORCHSSL: "TorchSSL", USB: "USB"}
COLORS = {OURS_PAPER: "tab:blue", OURS_CTA: "tab:purple", OURS_TORCHSSL: "tab:green", OURS_USB: "tab:olive",
          TORCHSSL: "tab:orange", USB: "tab:red"}


class Comparison(NamedTuple):
    title: str
    a: Arm
    b: Arm
    what: str


# The questions a study answers, each a pair of arms (a - b).
COMPARISONS = (
    Comparison("implementation check", OURS_TORCHSSL, TORCHSSL,
               "ours (TorchSSL recipe) − TorchSSL: the same recipe in two implementations"),
    Comparison("implementation check (USB)", OURS_USB, USB, "ours (USB recipe) − USB: the same recipe in two "
                                                            "implementations"),
    Comparison("recipe effect", OURS_PAPER, OURS_TORCHSSL,
               "ours (paper recipe) − ours (TorchSSL recipe): one implementation, two recipes"),
    Comparison("recipe effect (USB)", OURS_PAPER, OURS_USB,
               "ours (paper recipe) − ours (USB recipe): one implementation, two recipes"),
    Comparison("USB against TorchSSL", USB, TORCHSSL, "USB − TorchSSL: the two reference codebases, each its own "
                                                      "recipe"),
    Comparison("CTAugment against RandAugment", OURS_CTA, OURS_PAPER,
               "ours, paper recipe with CTAugment − with RandAugment: the paper's two strong augmentations in one "
               "implementation (TorchSSL and USB have no CTAugment, so this arm pairs with ours only)"),
)
# Spec fields that differ between the runs of one study by design; every other field defines the study.
PER_RUN_FIELDS = ("impl", "recipe", "n_labels", "seed", "split_sha256")
CHECKED = ("split_sha256", "data_sha256", "steps", "optimizer_steps")  # what compared runs must share
STATISTICS = (("final_top1", "final"), ("median20_top1", "median"))
ALGORITHM_NAMES = {"fixmatch": "FixMatch", "mixmatch": "MixMatch"}
# The settings an algorithm brings with it: runs of different algorithms that differ only in these (and in the
# algorithm) follow one protocol and are set side by side.
ALGORITHM_FIELDS = ("algorithm", *sorted({k for d in ALGORITHM_DEFAULTS.values() for k in d}
                                         | {k for names in ALGORITHM_SETTINGS.values() for k in names}))


def arm(run: dict) -> Arm:
    return Arm(run["spec"]["impl"], run["spec"].get("recipe", "paper"))


def cell(run: dict) -> Cell:
    return Cell(algorithm_of(run), arm(run))


def arm_name(a: Arm | Cell) -> str:
    if isinstance(a, Cell):
        return f"{algorithm_name(a.algorithm)}, {arm_name(a.arm)}"
    return ARMS.get(a, f"{a.impl} ({a.recipe} recipe)")


def arm_order(a: Arm | Cell) -> tuple:
    """Arms in ARMS order; cells by algorithm (ALGORITHMS order), then arm."""
    if isinstance(a, Cell):
        return (list(ALGORITHMS).index(a.algorithm) if a.algorithm in ALGORITHMS else len(ALGORITHMS),
                *arm_order(a.arm))
    return (list(ARMS).index(a) if a in ARMS else len(ARMS), tuple(a))


def algorithm_of(run: dict) -> str:
    return run["spec"].get("algorithm", "fixmatch")


def algorithm_name(algorithm: str) -> str:
    return ALGORITHM_NAMES.get(algorithm, algorithm)


def load_runs(out_dir: Path) -> list[dict]:
    """Every run under out_dir/runs holding a result.json: its spec, result, metrics and the problems found
    cross-checking them (harness/verify.py). Two folders holding the same run (a copy under another name) are
    one run: the second is flagged."""
    runs, seen = [], {}
    for run_dir in sorted((Path(out_dir) / "runs").glob("*")):
        run = load_run(run_dir)
        if run is None:
            continue
        key = run["result"].get("spec_hash") if run["result"] and not run["problems"] else None
        if key is not None and key in seen:
            run["problems"].append(f"{run_dir}: the same run as {seen[key]} (same spec hash {key}); it is counted "
                                   f"once: remove one of the two folders")
        elif key is not None:
            seen[key] = run_dir
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


def grouped(runs: list[dict], key: Callable[[dict], object]) -> list[list[dict]]:
    groups = defaultdict(list)
    for r in runs:
        groups[key(r)].append(r)
    return list(groups.values())


class Budget:
    """The runs of one study at one budget: per arm (or cell), per seed; the seeds every arm finished with matching
    split, data and steps (`seeds`), those it did not (`unpaired`), and the mismatches."""

    def __init__(self, n: int, runs: list[dict], key: Callable[[dict], Arm | Cell] = arm):
        self.n, self.key = n, key
        self.by_arm: dict[Arm | Cell, dict[int, dict]] = defaultdict(dict)
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

    def results(self, a, seeds=None) -> list[dict]:
        return [self.by_arm[a][s]["result"] for s in (self.seeds if seeds is None else seeds)]

    def compare(self, a, b, key: str) -> Paired | None:
        if a not in self.by_arm or b not in self.by_arm or not self.seeds:
            return None
        return paired(self.by_arm[a][s]["result"][key] - self.by_arm[b][s]["result"][key] for s in self.seeds)


def budgets_of(runs: list[dict], key=arm) -> list[Budget]:
    by_n = defaultdict(list)
    for r in runs:
        by_n[r["spec"]["n_labels"]].append(r)
    return [Budget(n, by_n[n], key) for n in sorted(by_n)]


def evaluated_on(spec: dict) -> str:
    return "the whole test set" if spec["eval_subset"] == 0 else f"a fixed subset of {spec['eval_subset']} test images"


def window_text(runs: list[dict]) -> str:
    """What the median covers: how many evaluations, how often, what share of training (runs may differ)."""
    parts = set()
    for r in runs:
        k, every, steps = r["result"].get("median_window", 20), r["spec"]["eval_every"], r["spec"]["steps"]
        share = min(100.0, 100.0 * k * every / steps)
        parts.add(f"median of the last {k} evaluation{'s' if k != 1 else ''} (every {every} steps: the last "
                  f"{share:.0f}% of training)")
    return "; runs differ: ".join(sorted(parts))
