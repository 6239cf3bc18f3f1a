"""Presets as data, and the plan: one RunSpec and run folder per (budget, seed, implementation)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from contract.spec import IMPLS, RunSpec

# Each preset is a set of RunSpec field values; every value can be overridden by a flag of the same name.
PRESETS: dict[str, dict] = {
    # Sohn et al. 2020, CIFAR-10: 2^20 steps, B 64, mu 7, SGD Nesterov 0.9, lr 0.03, wd 5e-4, tau 0.95, EMA 0.999.
    "paper": dict(steps=2**20, eval_every=5000, checkpoint_every=5000, log_every=100),
    # The same schedule over 2^17 steps, what people run when GPU time is short.
    "short": dict(steps=2**17, eval_every=5000, checkpoint_every=5000, log_every=100),
    # Both implementations at all three budgets on a 2-core CPU in minutes: still WRN-28-2 and the paper's
    # losses and optimiser, but a handful of steps, tiny batches and a fixed 1,000-image test subset.
    "smoke": dict(steps=48, eval_every=12, batch_size=4, uratio=2, eval_subset=1000, eval_batch_size=500,
                  checkpoint_every=24, log_every=4),
}
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(RunSpec)
                    if f.name not in ("impl", "n_labels", "seed", "data_kind", "data_sha256", "split_sha256",
                                      "dataset", "num_classes"))


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    run_dir: Path
    split_file: Path


def preset_values(preset: str, overrides: dict) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot override {unknown}; overridable settings: {', '.join(OVERRIDABLE)}")
    return {**PRESETS[preset], **overrides}  # overrides: only the values set (harness.main leaves unset flags out)


def plan_runs(*, budgets, seeds, impls, preset: str, overrides: dict, out_dir: Path, data_kind: str,
              data_sha256: str, splits: dict[tuple[int, int], tuple[Path, str]]) -> list[PlannedRun]:
    """splits maps (budget, seed) to (split file, sha256); every implementation of a pair gets the same one."""
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ValueError(f"unknown implementation {bad[0]!r}; accepted: {', '.join(IMPLS)}")
    values = preset_values(preset, overrides)
    runs = []
    for n in budgets:
        for seed in seeds:
            split_file, split_sha = splits[(n, seed)]
            for impl in impls:
                spec = RunSpec(impl=impl, n_labels=n, seed=seed, data_kind=data_kind, data_sha256=data_sha256,
                               split_sha256=split_sha, **values)
                runs.append(PlannedRun(spec, Path(out_dir) / "runs" / spec.name, split_file))
    return runs
