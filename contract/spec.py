"""RunSpec: the frozen definition of one run, its stable hash, and the spec.json file of a run folder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.results import read_json, write_json_atomic

IMPLS = ("own", "torchssl")
PRECISIONS = ("fp32", "bf16")
SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run. The device is not part of it: it is where a run executes, not what it is."""

    impl: str  # "own" | "torchssl"
    n_labels: int  # labelled images in total (n/10 per class)
    seed: int  # seeds the split and the run's own random generators
    data_kind: str  # source kind of the data set, e.g. "image-folder-tar"
    data_sha256: str  # sha256 of the decoded arrays (train_x, train_y, test_x, test_y)
    split_sha256: str  # sha256 of the sorted labelled indices (int64 little endian)
    dataset: str = "cifar10"
    num_classes: int = 10
    steps: int = 2**20  # optimizer steps, exactly
    eval_every: int = 5000  # steps between evaluations (and one at the end)
    batch_size: int = 64  # B, labelled images per step
    uratio: int = 7  # mu, unlabelled images per labelled one
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    threshold: float = 0.95  # tau, confidence threshold for pseudo-labels
    lambda_u: float = 1.0
    ema_decay: float = 0.999
    depth: int = 28  # WideResNet depth
    widen_factor: int = 2
    precision: str = "fp32"  # "fp32" | "bf16" (autocast)
    channels_last: bool = False
    eval_subset: int = 0  # 0: the whole test set; n: a fixed class-balanced subset of n test images
    eval_batch_size: int = 256
    checkpoint_every: int = 5000  # steps between checkpoints (also written on interruption and at the end)
    log_every: int = 50  # steps between training-statistics lines in metrics.jsonl

    def __post_init__(self) -> None:
        problems = []
        if self.impl not in IMPLS:
            problems.append(f"impl {self.impl!r} is not one of {IMPLS}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {PRECISIONS}")
        for name in ("steps", "eval_every", "batch_size", "uratio", "depth", "widen_factor",
                     "eval_batch_size", "checkpoint_every", "log_every", "num_classes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_labels < 1 or self.n_labels % self.num_classes:
            problems.append(f"n_labels must be a positive multiple of {self.num_classes}, got {self.n_labels}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must lie in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.lambda_u >= 0:
            problems.append(f"lambda_u must be >= 0, got {self.lambda_u}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if (self.depth - 4) % 6:
            problems.append(f"WideResNet depth must be 6n+4, got {self.depth}")
        if self.eval_subset < 0 or self.eval_subset % self.num_classes:
            problems.append(f"eval_subset must be 0 or a positive multiple of {self.num_classes}, got {self.eval_subset}")
        if problems:
            raise ValueError("invalid run spec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown run-spec fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def hash(self) -> str:
        """Stable across processes and machines: sha256 of the canonical JSON of every field, first 12 hex digits."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.n_labels}-seed{self.seed}-{self.impl}-{self.hash()}"


@dataclass(frozen=True)
class RunFiles:
    """What a run folder's spec.json holds besides the spec: where the inputs are and where to run."""

    data_dir: str  # folder of the cached arrays (train_x.npy, train_y.npy, test_x.npy, test_y.npy)
    split_file: str  # the split JSON (labelled indices and their sha256)
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # implementation-specific settings, e.g. the TorchSSL checkout


def write_spec(run_dir: Path, spec: RunSpec, files: RunFiles) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec.to_dict(), "spec_hash": spec.hash(), **dataclasses.asdict(files)}
    path = run_dir / SPEC_FILE
    write_json_atomic(path, payload)
    return path


def read_spec(path: Path) -> tuple[RunSpec, RunFiles]:
    payload = read_json(path, "run spec")
    spec = RunSpec.from_dict(payload["spec"])
    if payload.get("spec_hash") not in (None, spec.hash()):
        raise ValueError(f"run spec {path}: stored hash {payload['spec_hash']} != recomputed {spec.hash()} (edited by hand?)")
    files = RunFiles(data_dir=payload["data_dir"], split_file=payload["split_file"],
                     device=payload.get("device", "cpu"), extra=payload.get("extra", {}))
    return spec, files
