"""Reading the cached data arrays and split files named in a run folder, with their checksums."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.results import read_json
from contract.spec import RunFiles, RunSpec

ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the four arrays in a fixed order: dtype, shape and C-order bytes of each."""
    h = hashlib.sha256()
    for name in ARRAY_NAMES:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def indices_sha256(indices) -> str:
    """sha256 of the sorted indices as little-endian int64: order-independent, so any holder can verify a set."""
    a = np.sort(np.asarray(indices, dtype="<i8"))
    return hashlib.sha256(a.tobytes()).hexdigest()


@dataclass(frozen=True)
class DataArrays:
    train_x: np.ndarray  # (N, 32, 32, 3) uint8, HWC
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray  # (M, 32, 32, 3) uint8
    test_y: np.ndarray  # (M,) int64
    classes: tuple[str, ...]
    sha256: str


def load_arrays(data_dir: Path, expect_sha256: str | None = None) -> DataArrays:
    """Load the cached arrays; recompute their checksum and refuse a mismatch with `expect_sha256`."""
    data_dir = Path(data_dir)
    try:
        arrays = {n: np.load(data_dir / f"{n}.npy") for n in ARRAY_NAMES}
        meta = read_json(data_dir / "identity.json", "data identity file")  # a damaged one is named
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cached data arrays incomplete in {data_dir}: {e.filename or e} is missing") from None
    sha = arrays_sha256(arrays)
    if expect_sha256 is not None and sha != expect_sha256:
        raise ValueError(f"data arrays in {data_dir} have sha256 {sha}, the run spec expects {expect_sha256}")
    return DataArrays(arrays["train_x"], arrays["train_y"].astype(np.int64), arrays["test_x"],
                      arrays["test_y"].astype(np.int64), tuple(meta["classes"]), sha)


def load_split(path: Path, expect_sha256: str | None = None) -> np.ndarray:
    """The sorted labelled indices of a split file, verified against the file's own and the spec's sha256."""
    payload = read_json(path, "split file")
    idx = np.asarray(payload["labeled_indices"], dtype=np.int64)
    sha = indices_sha256(idx)
    if sha != payload["sha256"]:
        raise ValueError(f"split file {path} is corrupt: its indices hash to {sha}, the file says {payload['sha256']}")
    if expect_sha256 is not None and sha != expect_sha256:
        raise ValueError(f"split file {path} has sha256 {sha}, the run spec expects {expect_sha256}")
    return np.sort(idx)


def eval_subset_indices(test_y: np.ndarray, n: int, num_classes: int = 10) -> np.ndarray:
    """The fixed evaluation subset: the first n/num_classes test images of each class, in index order (0: all)."""
    if n == 0:
        return np.arange(len(test_y))
    per = n // num_classes
    return np.sort(np.concatenate([np.flatnonzero(test_y == c)[:per] for c in range(num_classes)]))


def load_run_inputs(spec: RunSpec, files: RunFiles) -> tuple[DataArrays, np.ndarray, np.ndarray]:
    """What a run folder's spec.json names, loaded and checked against the spec: the arrays, the sorted labelled
    indices and the evaluation subset's indices into the test set."""
    arrays = load_arrays(Path(files.data_dir), expect_sha256=spec.data_sha256)
    labelled = load_split(Path(files.split_file), expect_sha256=spec.split_sha256)
    if len(arrays.classes) != spec.num_classes:
        raise ValueError(f"data has {len(arrays.classes)} classes, the spec says {spec.num_classes}")
    if len(labelled) != spec.n_labels:
        raise ValueError(f"split file {files.split_file} holds {len(labelled)} indices, the spec says {spec.n_labels}")
    if labelled.min() < 0 or labelled.max() >= len(arrays.train_y):
        raise ValueError(f"split file {files.split_file} indexes outside the {len(arrays.train_y)} train images")
    return arrays, labelled, eval_subset_indices(arrays.test_y, spec.eval_subset, spec.num_classes)
