"""Seeded, class-balanced label splits, saved once as files and verified on every later use."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from contract.arrays import indices_sha256
from contract.results import write_json_once
from contract.spec import budget_problem
from harness.verify import set_aside


class SplitError(ValueError):
    """A bad label budget, or a split file that disagrees with the split it should hold."""


def check_budget(n_labels: int, per_class_available: int, num_classes: int = 10) -> None:
    """A budget must be a positive multiple of the class count (contract.spec's rule) that the smallest class can
    supply."""
    problem = budget_problem(n_labels, num_classes)
    if problem:
        raise SplitError(problem)
    if n_labels // num_classes > per_class_available:
        raise SplitError(f"label budget {n_labels} is not accepted: it needs {n_labels // num_classes} images per "
                         f"class, but the smallest class holds {per_class_available} "
                         f"(at most {per_class_available * num_classes})")


def make_split(train_y: np.ndarray, n_labels: int, seed: int, num_classes: int = 10) -> np.ndarray:
    """n/num_classes indices per class drawn without replacement by a local Generator(seed); sorted."""
    check_budget(n_labels, int(np.bincount(train_y, minlength=num_classes).min()), num_classes)
    rng = np.random.default_rng(seed)
    per_class = n_labels // num_classes
    picks = [rng.choice(np.flatnonzero(train_y == c), per_class, replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def split_path(out_dir: Path, dataset: str, n_labels: int, seed: int) -> Path:
    return Path(out_dir) / "splits" / f"{dataset}-{n_labels}-seed{seed}.json"


def ensure_split(out_dir: Path, dataset: str, train_y: np.ndarray, n_labels: int, seed: int,
                 data_sha256: str) -> tuple[Path, str]:
    """Write the split file if absent; if present, check it equals the regenerated split. Returns (path, sha256)."""
    idx = make_split(train_y, n_labels, seed)
    sha = indices_sha256(idx)
    path = split_path(out_dir, dataset, n_labels, seed)
    if path.exists():
        try:
            old = json.loads(path.read_text())
            old_sha = indices_sha256(old["labeled_indices"])
        except FileNotFoundError:  # another process set a damaged one aside meanwhile
            return ensure_split(out_dir, dataset, train_y, n_labels, seed, data_sha256)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            # Damaged (cut short, not a split): the split is a function of (data, budget, seed) and every run
            # spec carries its sha256, so drawing it again loses nothing; the damaged file is kept beside it.
            try:
                kept = set_aside(path)
                print(f"warning: split file {path} is unreadable ({type(e).__name__}: {e}); kept as {kept.name} "
                      f"and drawn again", file=sys.stderr)
            except FileNotFoundError:  # another process set it aside first
                pass
            return ensure_split(out_dir, dataset, train_y, n_labels, seed, data_sha256)
        if old_sha != sha or old.get("sha256") != sha:
            raise SplitError(f"split file {path} holds split {old_sha[:12]} but (budget {n_labels}, seed {seed}) on "
                             f"this data gives {sha[:12]}; it is never overwritten: use another --out, or move the "
                             f"file away if it is stale")
        if old.get("data_sha256") != data_sha256:
            raise SplitError(f"split file {path} was drawn on data {str(old.get('data_sha256'))[:12]}, not on this "
                             f"data set ({data_sha256[:12]}); use another --out for another data source")
        return path, sha
    labels_sha = indices_sha256(train_y[idx])  # the labels of the chosen images, in index order
    path.parent.mkdir(parents=True, exist_ok=True)
    written = write_json_once(path, {
        "dataset": dataset, "n_labels": n_labels, "seed": seed, "data_sha256": data_sha256,
        "per_class": np.bincount(train_y[idx]).tolist(),
        "labels_sha256": labels_sha, "sha256": sha, "labeled_indices": idx.tolist(),
    })
    if not written:  # another process drew it first: theirs is checked like any existing file
        return ensure_split(out_dir, dataset, train_y, n_labels, seed, data_sha256)
    return path, sha
