"""Presets and each algorithm's defaults as data, and the plan: every value checked before any work, then the data
set, the split files and one RunSpec and run folder per (algorithm, budget, seed, implementation and recipe)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contract.spec import (ALGORITHM_DEFAULTS, ALGORITHM_SETTINGS, ALGORITHMS, MAX_SEED, RECIPES, REFERENCES,
                           STRONG_AUGMENTATION_RECIPES, RunSpec, settings_problems)
from harness.data import CIFAR10_COUNTS
from harness.splits import check_budget

# Each preset is a set of RunSpec setting values, for every algorithm unless "per_algorithm" gives an algorithm its
# own; every value can be overridden by a flag of the same name.
PRESETS: dict[str, dict] = {
    # Sohn et al. 2020, CIFAR-10: 2^20 steps, B 64, mu 7, SGD Nesterov 0.9, lr 0.03, wd 5e-4, tau 0.95, EMA 0.999,
    # evaluated as the official code does: every 64 kimg (1024 steps at B=64), the median of the last 20 reported.
    "paper": dict(steps=2**20, eval_every=1024, checkpoint_every=8192, log_every=128),
    # The same schedule over 2^17 steps, what people run when GPU time is short.
    "short": dict(steps=2**17, eval_every=1024, checkpoint_every=8192, log_every=128),
    # Both implementations at all three budgets on a 2-core CPU in minutes: still WRN-28-2 and the paper's
    # losses and optimiser, but a handful of steps, tiny batches and a fixed 1,000-image test subset.
    # mu 2 for FixMatch (whose mu is 7); MixMatch keeps its mu 1.
    "smoke": dict(steps=48, eval_every=12, batch_size=4, eval_subset=1000, eval_batch_size=500,
                  checkpoint_every=24, log_every=4, per_algorithm={"fixmatch": dict(uratio=2)}),
    # A comparison that means something within an hour on a 2-core CPU: 500 steps of B=16, mu=2. BatchNorm momentum
    # 0.01 and EMA decay 0.99 (not 0.001 and 0.999) so that the evaluated EMA model and its BatchNorm statistics
    # follow training within a few hundred steps; with the paper's values they stay near their initial state for
    # thousands of steps and every model scores near chance. Evaluated every 50 steps on a fixed 2,000-image subset.
    "equivalence": dict(steps=500, eval_every=50, batch_size=16, bn_momentum=0.01, ema_decay=0.99,
                        eval_subset=2000, eval_batch_size=500, checkpoint_every=250, log_every=10,
                        per_algorithm={"fixmatch": dict(uratio=2)}),
}
CIFAR10_TEST_IMAGES = 10_000


class UsageError(ValueError):
    """A flag value that cannot be used; reported as one line."""


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    run_dir: Path
    split_file: Path


@dataclass
class Plan:
    preset: str
    devices: list[str]
    data: object  # harness.data.Dataset
    cache_dir: Path | None
    data_source: str = ""  # the data set's identity and how its source stores pixels
    runs: list[PlannedRun] = field(default_factory=list)
    splits: dict[tuple[int, int], tuple[Path, str]] = field(default_factory=dict)

    def describe(self) -> str:
        d = self.data
        lines = [f"data: {self.data_source}", f"      cached arrays {d.data_dir}",
                 f"      train per class {np.bincount(d.train_y, minlength=10).tolist()}, "
                 f"test per class {np.bincount(d.test_y, minlength=10).tolist()}"]
        lines += [f"split: {path}  sha256 {sha}" for path, sha in self.splits.values()]
        lines.append(f"plan: {len(self.runs)} runs, preset {self.preset}, devices {', '.join(self.devices)}")
        for r in self.runs:
            s = r.spec
            lines.append(f"  {s.impl:8s} {s.recipe:8s} {s.algorithm:8s} n_labels={s.n_labels:<5d} seed={s.seed:<3d} "
                         f"steps={s.steps:<8d} eval_every={s.eval_every:<6d} B={s.batch_size} mu={s.uratio} "
                         f"hash={s.hash()}  {r.run_dir}")
        return "\n".join(lines)


def preset_values(preset: str, overrides: dict, algorithm: str = "fixmatch") -> dict:
    """The settings of `algorithm`'s runs: its defaults, then the preset's values (for every algorithm, then its
    own), then the flags given. A flag for another algorithm's own setting (ALGORITHM_SETTINGS, e.g. --threshold
    for MixMatch runs) is left out: it applies to its algorithm's runs only (check_overrides refuses one that
    applies to none of the runs asked for)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    if algorithm not in ALGORITHMS:
        raise UsageError(f"algorithm {algorithm!r} is not accepted; accepted: {', '.join(ALGORITHMS)}")
    shared = {k: v for k, v in PRESETS[preset].items() if k != "per_algorithm"}
    own = PRESETS[preset].get("per_algorithm", {}).get(algorithm, {})
    foreign = {name for a, names in ALGORITHM_SETTINGS.items() if a != algorithm for name in names}
    given = {k: v for k, v in overrides.items() if k not in foreign}  # overrides: only the values set
    return {**ALGORITHM_DEFAULTS[algorithm], **shared, **own, **given}


def check_overrides(overrides: dict, algorithms) -> None:
    """A flag for an algorithm's own setting needs a run of that algorithm."""
    for owner, names in ALGORITHM_SETTINGS.items():
        for name in names:
            if name in overrides and owner not in algorithms:
                raise UsageError(f"--{name.replace('_', '-')} is a {owner} setting, and --algorithms "
                                 f"{' '.join(algorithms)} runs no {owner}; add {owner} to --algorithms or leave it out")


def check_request(budgets, seeds, impls, values: dict, recipes=("paper",), algorithms=("fixmatch",)) -> None:
    """Every value of a request, checked before any data is decoded or any file written; one line each.
    values: each algorithm's settings (preset_values), by algorithm."""
    for flag, given in (("--budgets", budgets), ("--seeds", seeds), ("--impls", impls), ("--recipes", recipes),
                        ("--algorithms", algorithms)):
        if len(set(given)) != len(given):
            raise UsageError(f"{flag} {' '.join(map(str, given))} repeats a value; give each once")
    bad_seeds = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        raise UsageError(f"--seeds {bad_seeds[0]} is not accepted; seeds are integers in 0..{MAX_SEED}")
    for n in budgets:  # CIFAR-10's counts: a budget its classes cannot supply fails before any decoding
        check_budget(n, CIFAR10_COUNTS["train"])
    for algorithm in algorithms:
        check_settings(values[algorithm], impls, algorithm)
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise UsageError(f"--recipes {bad[0]} is not accepted; accepted: {', '.join(RECIPES)}")
    unused = [r for r in recipes if r in STRONG_AUGMENTATION_RECIPES and "fixmatch" not in algorithms]
    if unused and "own" in impls:
        raise UsageError(f"--recipes {unused[0]} changes FixMatch's strong augmentation, and --algorithms "
                         f"{' '.join(algorithms)} runs no FixMatch; add fixmatch or leave it out")


def check_settings(values: dict, impls, algorithm: str) -> None:
    problems = settings_problems(values, algorithm=algorithm)
    if problems:
        raise UsageError(f"invalid {algorithm} run spec: " + "; ".join(problems))
    if values.get("eval_subset", 0) > CIFAR10_TEST_IMAGES:
        raise UsageError(f"--eval-subset {values['eval_subset']} is more than the {CIFAR10_TEST_IMAGES} test images; "
                         f"accepted: 0 (all) or a multiple of 10 up to {CIFAR10_TEST_IMAGES}")
    references = [i for i in impls if i in REFERENCES]
    if references and values.get("channels_last"):
        raise UsageError(f"--channels-last is not accepted with {', '.join(references)} (a reference runs as it "
                         f"ships); leave it out or use --impls own")


def resolve_devices(device: str, gpus: list[int] | None) -> list[str]:
    """The devices runs are spread over: one run per device at a time."""
    import torch

    if gpus:
        if not torch.cuda.is_available():
            raise UsageError(f"--gpus {' '.join(map(str, gpus))} needs CUDA, but torch sees no GPU; use --device cpu")
        bad = [g for g in gpus if not 0 <= g < torch.cuda.device_count()]
        if bad:
            raise UsageError(f"--gpus {bad[0]} is not a GPU index; accepted: 0..{torch.cuda.device_count() - 1}")
        return [f"cuda:{g}" for g in gpus]
    if device == "auto":
        return ["cuda:0" if torch.cuda.is_available() else "cpu"]
    if device == "cpu":
        return ["cpu"]
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: torch sees no GPU here; accepted: auto, cpu")
        index = device.partition(":")[2] or "0"
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {device} is not a GPU here; accepted: "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return [f"cuda:{index}"]
    raise UsageError(f"--device {device!r} is not accepted; accepted: auto, cpu, cuda, cuda:N")


def arms(impls, recipes, algorithm: str = "fixmatch") -> list[tuple[str, str]]:
    """(implementation, recipe) of each run per (budget, seed): ours once per recipe that applies to the algorithm
    (CTAugment only to FixMatch), each reference implementation with its own."""
    out = []
    for impl in impls:
        if impl == "own":
            out += [(impl, r) for r in recipes if algorithm == "fixmatch" or r not in STRONG_AUGMENTATION_RECIPES]
        else:
            out.append((impl, impl))
    return out


def plan_runs(*, budgets, seeds, impls, values: dict, out_dir: Path, data_kind: str, data_sha256: str,
              splits: dict[tuple[int, int], tuple[Path, str]], recipes=("paper",),
              algorithm: str = "fixmatch") -> list[PlannedRun]:
    """The runs of one algorithm (values: its settings, preset_values). splits maps (budget, seed) to (split file,
    sha256); every run of a (budget, seed) gets the same one, whatever its algorithm."""
    runs = []
    for n in budgets:
        for seed in seeds:
            split_file, split_sha = splits[(n, seed)]
            for impl, recipe in arms(impls, recipes, algorithm):
                spec = RunSpec(algorithm=algorithm, impl=impl, recipe=recipe, n_labels=n, seed=seed,
                               data_kind=data_kind, data_sha256=data_sha256, split_sha256=split_sha, **values)
                runs.append(PlannedRun(spec, Path(out_dir) / "runs" / spec.name, split_file))
    return runs


def make_plan(*, budgets, seeds, impls, preset: str, overrides: dict, out_dir: Path, device: str,
              gpus: list[int] | None, data: str | None, cache_dir: Path | None, recipes=("paper",),
              algorithms=("fixmatch",), devices: list[str] | None = None) -> Plan:
    """Check the request, then decode (or find cached) the data, write or verify the split files, plan the runs.
    devices: where runs execute when that is decided elsewhere (a Slurm job's, resolved on its node); None: here,
    from device and gpus."""
    from harness.data import describe_pixels, load_cifar10
    from harness.env import user_path
    from harness.splits import ensure_split

    check_overrides(overrides, algorithms)
    values = {a: preset_values(preset, overrides, a) for a in algorithms}
    check_request(budgets, seeds, impls, values, recipes, algorithms)
    devices = devices or resolve_devices(device, gpus)
    data = str(user_path(data)) if data else None  # ~ expanded and absolute, once
    dataset = load_cifar10(data, cache_dir=cache_dir)
    plan = Plan(preset, devices, dataset, cache_dir,
                f"{dataset.identity.describe()}: {describe_pixels(dataset.identity.kind, data)}")
    for n in budgets:
        for seed in seeds:
            plan.splits[(n, seed)] = ensure_split(out_dir, "cifar10", dataset.train_y, n, seed,
                                                  dataset.identity.data_sha256)
    for a in algorithms:
        plan.runs += plan_runs(budgets=budgets, seeds=seeds, impls=impls, values=values[a], out_dir=out_dir,
                               data_kind=dataset.identity.kind, data_sha256=dataset.identity.data_sha256,
                               splits=plan.splits, recipes=recipes, algorithm=a)
    return plan
