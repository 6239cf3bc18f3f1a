"""RunSpec: the frozen definition of one run, its stable hash, its checks, and the spec.json file of a run folder."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.results import read_json, write_json_atomic

IMPLS = ("own", "torchssl", "usb")
REFERENCES = ("torchssl", "usb")  # implementations we compare against: each runs its own recipe (recipe == impl)
ALGORITHMS = ("fixmatch", "mixmatch")
# The settings only one algorithm uses: set (not None) for its runs, None for every other algorithm's, so that they
# are left out of the other runs' hashes (RunSpec.hash) and adding an algorithm renames no run of another.
ALGORITHM_SETTINGS = {"fixmatch": ("threshold",), "mixmatch": ("mixup_alpha", "temperature", "ramp_up")}
# Each algorithm's own settings, over RunSpec's defaults (which are FixMatch's, Sohn et al. 2020: mu 7, tau 0.95,
# lambda_u 1). MixMatch follows TorchSSL's CIFAR-10 config (config/mixmatch/mixmatch_cifar10_{40,250,4000}_0.yaml at
# the pin), so that ours and TorchSSL's are compared on one recipe: B 64, uratio 1, alpha 0.5, T 0.5, lambda_u 100
# ramped up linearly over the first 40% of the steps, SGD lr 0.03 Nesterov 0.9, weight decay 5e-4, cosine decay, EMA
# 0.999 (the last four as FixMatch's, i.e. RunSpec's defaults). The MixMatch paper and its official code instead use
# Adam lr 0.002 (constant, decoupled weight decay 0.02 * lr per step), alpha 0.75, lambda_u 75 and a ramp-up over
# the first 16,384 steps (ramp_up 1/64 of 2^20); the optimizer is not a setting here, the rest can be given by flag.
ALGORITHM_DEFAULTS: dict[str, dict] = {
    "fixmatch": {},
    "mixmatch": dict(uratio=1, lambda_u=100.0, threshold=None, mixup_alpha=0.5, temperature=0.5, ramp_up=0.4),
}
MIXMATCH_VIEWS = 2  # K, weak views of each unlabelled image (the paper's, the official code's and TorchSSL's)
# Which augmentation, sampling and network wiring a run follows: the paper's (our implementation's default) or
# TorchSSL's, which our implementation reproduces and TorchSSL always runs (own_impl/recipes.py has the table).
RECIPES = ("paper", "torchssl", "usb", "paper-cta")
STRONG_AUGMENTATION_RECIPES = ("paper-cta",)  # recipes that only change the strong augmentation: FixMatch's alone
PRECISIONS = ("fp32", "tf32", "bf16")  # what each means on CUDA: contract/precision.py
SPEC_FILE = "spec.json"
# The fields that place a run in a study (what it is run on); every other field is a setting a preset gives.
IDENTITY_FIELDS = ("algorithm", "impl", "recipe", "n_labels", "seed", "data_kind", "data_sha256", "split_sha256",
                   "dataset", "num_classes")
MAX_SEED = 2**32 - 1  # numpy's SeedSequence and torch.manual_seed accept any int, the split files' readers too


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run. The device is not part of it: it is where a run executes, not what it is."""

    impl: str  # "own" | "torchssl" | "usb"
    n_labels: int  # labelled images in total (n/num_classes per class)
    seed: int  # seeds the split and the run's own random generators
    data_kind: str  # source kind of the data set, e.g. "image-folder-tar"
    data_sha256: str  # sha256 of the decoded arrays (train_x, train_y, test_x, test_y)
    split_sha256: str  # sha256 of the sorted labelled indices (int64 little endian)
    algorithm: str = "fixmatch"
    recipe: str = "paper"  # "paper" | "torchssl" | "usb"; a reference's run is always its own (recipe == impl)
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
    threshold: float | None = 0.95  # FixMatch: tau, confidence threshold for pseudo-labels (None for MixMatch)
    lambda_u: float = 1.0  # weight of the unlabelled loss (MixMatch: its value after the ramp-up)
    ema_decay: float = 0.999
    bn_momentum: float = 0.001  # every BatchNorm's, PyTorch convention (the paper's and TorchSSL's 0.001)
    depth: int = 28  # WideResNet depth
    widen_factor: int = 2
    precision: str = "fp32"  # "fp32" (full fp32) | "tf32" (TF32 on CUDA) | "bf16" (autocast)
    channels_last: bool = False
    eval_subset: int = 0  # 0: the whole test set; n: a fixed class-balanced subset of n test images
    eval_batch_size: int = 256
    checkpoint_every: int = 5000  # steps between checkpoints (also written on interruption and at the end)
    log_every: int = 50  # steps between training-statistics lines in metrics.jsonl
    mixup_alpha: float | None = None  # MixMatch: alpha of MixUp's Beta(alpha, alpha)
    temperature: float | None = None  # MixMatch: T, the sharpening temperature of the guessed labels
    ramp_up: float | None = None  # MixMatch: fraction of the steps over which lambda_u rises linearly from 0

    def __post_init__(self) -> None:
        problems = spec_problems(self.to_dict())
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
        """Stable across processes and machines: sha256 of the canonical JSON of every field, first 12 hex digits.
        A field that does not apply to the run's algorithm is None and left out, so adding an algorithm's settings
        never renames the runs of another."""
        fields = {k: v for k, v in self.to_dict().items() if v is not None}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        arm = self.impl if self.impl in REFERENCES else f"{self.impl}-{self.recipe}"
        return f"{self.dataset}-{self.algorithm}-{self.n_labels}-seed{self.seed}-{arm}-{self.hash()}"

    @property
    def images_per_step(self) -> int:
        """Images through the model's forward passes in one step. FixMatch: B labelled, muB weak and muB strong
        unlabelled. MixMatch: K muB through the label-guessing passes (no gradient), then the B + K muB mixed ones."""
        if self.algorithm == "mixmatch":
            return self.batch_size * (1 + 2 * MIXMATCH_VIEWS * self.uratio)
        return self.batch_size * (1 + 2 * self.uratio)


SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec) if f.name not in IDENTITY_FIELDS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunSpec) if f.default is not dataclasses.MISSING}


def budget_problem(n_labels: int, num_classes: int = 10) -> str | None:
    """The rule for a label budget: a positive multiple of the class count (so every class gets n/C labels)."""
    if n_labels <= 0 or n_labels % num_classes:
        return (f"label budget {n_labels} is not accepted: it must be a positive multiple of {num_classes} (the "
                f"number of classes), e.g. 40, 250 or 4000")
    return None


def settings_problems(values: dict[str, Any], num_classes: int = 10, algorithm: str = "fixmatch") -> list[str]:
    """What is wrong with a preset's setting values for `algorithm`'s runs (a subset of SETTING_FIELDS; missing ones
    take the defaults). The one place every setting is checked: RunSpec runs it on construction, planning before
    any work."""
    unknown = sorted(set(values) - set(SETTING_FIELDS))
    if unknown:
        return [f"unknown settings {unknown}; known: {', '.join(SETTING_FIELDS)}"]
    v = {**{k: _DEFAULTS[k] for k in SETTING_FIELDS}, **values}
    problems = algorithm_settings_problems(v, algorithm)
    if v["precision"] not in PRECISIONS:
        problems.append(f"precision {v['precision']!r} is not one of {PRECISIONS}")
    for name in ("steps", "eval_every", "batch_size", "uratio", "depth", "widen_factor", "eval_batch_size",
                 "checkpoint_every", "log_every"):
        if not isinstance(v[name], int) or isinstance(v[name], bool) or v[name] < 1:
            problems.append(f"{name} must be a positive integer, got {v[name]!r}")
    # finite first: inf passes "> 0" and then fails deep inside a run
    finite = {k: v[k] for k in ("lr", "momentum", "weight_decay", "threshold", "lambda_u", "ema_decay",
                                "bn_momentum", "mixup_alpha", "temperature", "ramp_up") if v[k] is not None}
    for name, x in finite.items():
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            problems.append(f"{name} must be a finite number, got {x!r}")
    if problems:
        return problems
    if not v["lr"] > 0:
        problems.append(f"lr must be positive, got {v['lr']}")
    if not 0.0 <= v["momentum"] < 1.0:
        problems.append(f"momentum must lie in [0, 1), got {v['momentum']}")
    if not v["weight_decay"] >= 0:
        problems.append(f"weight_decay must be >= 0, got {v['weight_decay']}")
    if not v["lambda_u"] >= 0:
        problems.append(f"lambda_u must be >= 0, got {v['lambda_u']}")
    if v["threshold"] is not None and not 0.0 <= v["threshold"] <= 1.0:
        problems.append(f"threshold must lie in [0, 1], got {v['threshold']}")
    if v["mixup_alpha"] is not None and not v["mixup_alpha"] > 0:
        problems.append(f"mixup_alpha must be positive (Beta(alpha, alpha)), got {v['mixup_alpha']}")
    if v["temperature"] is not None and not v["temperature"] > 0:
        problems.append(f"temperature must be positive, got {v['temperature']}")
    if v["ramp_up"] is not None and not 0.0 <= v["ramp_up"] <= 1.0:
        problems.append(f"ramp_up must lie in [0, 1] (a fraction of the steps), got {v['ramp_up']}")
    if not 0.0 <= v["ema_decay"] < 1.0:
        problems.append(f"ema_decay must lie in [0, 1), got {v['ema_decay']}")
    if not 0.0 < v["bn_momentum"] <= 1.0:
        problems.append(f"bn_momentum must lie in (0, 1], got {v['bn_momentum']}")
    if (v["depth"] - 4) % 6:
        problems.append(f"WideResNet depth must be 6n+4, got {v['depth']}")
    if v["eval_subset"] < 0 or v["eval_subset"] % num_classes:
        problems.append(f"eval_subset must be 0 or a positive multiple of {num_classes}, got {v['eval_subset']}")
    return problems


def algorithm_settings_problems(v: dict[str, Any], algorithm: str) -> list[str]:
    """Each algorithm-only setting (ALGORITHM_SETTINGS) is set for its algorithm's runs and None for the others'."""
    if algorithm not in ALGORITHMS:
        return [f"algorithm {algorithm!r} is not one of {ALGORITHMS}"]
    problems = []
    for owner, names in ALGORITHM_SETTINGS.items():
        for name in names:
            if owner == algorithm and v[name] is None:
                problems.append(f"{name} must be set for {algorithm} runs")
            elif owner != algorithm and v[name] is not None:
                problems.append(f"{name} is a {owner} setting; it must be None for {algorithm} runs, got {v[name]!r}")
    return problems


def spec_problems(d: dict[str, Any]) -> list[str]:
    """settings_problems plus the identity fields' rules."""
    if d["num_classes"] < 1:
        return [f"num_classes must be a positive integer, got {d['num_classes']!r}"]
    problems = settings_problems({k: d[k] for k in SETTING_FIELDS if k in d}, d["num_classes"], d["algorithm"])
    if d["impl"] not in IMPLS:
        problems.append(f"impl {d['impl']!r} is not one of {IMPLS}")
    if d["recipe"] not in RECIPES:
        problems.append(f"recipe {d['recipe']!r} is not one of {RECIPES}")
    elif d["impl"] in REFERENCES and d["recipe"] != d["impl"]:
        problems.append(f"{d['impl']} runs its own recipe only (recipe {d['impl']!r}), not {d['recipe']!r}")
    elif d["recipe"] in STRONG_AUGMENTATION_RECIPES and d["algorithm"] != "fixmatch":
        problems.append(f"recipe {d['recipe']!r} changes FixMatch's strong augmentation; {d['algorithm']} has none")
    problem = budget_problem(d["n_labels"], d["num_classes"])
    if problem:
        problems.append(problem)
    if not 0 <= d["seed"] <= MAX_SEED:
        problems.append(f"seed must lie in [0, 2^32 - 1], got {d['seed']}")
    return problems


@dataclass(frozen=True)
class RunFiles:
    """What a run folder's spec.json holds besides the spec: where the inputs are, where and how to run, and what
    the harness knows that a result must carry. Nothing here changes what a run computes."""

    data_dir: str  # folder of the cached arrays (train_x.npy, train_y.npy, test_x.npy, test_y.npy)
    split_file: str  # the split JSON (labelled indices and their sha256)
    device: str = "cpu"
    code_version: str = "unknown"  # this project's commit (-dirty: uncommitted changes), or its package version
    machine: str = ""  # the accelerator, or the CPU model and core count
    data_source: str = ""  # what the data set was decoded from and how it stores pixels, for reports
    compile: bool | None = None  # own: torch.compile asked for (True/False) or left to own_impl's policy (None)
    compile_binding: bool = True  # own: an asked-for compile that fails fails the run; False: falls back to eager
    num_workers: int | None = None  # torchssl: its DataLoader workers (None: TorchSSL's config)
    torchssl_checkout: str | None = None  # torchssl: the verified checkout to import TorchSSL from
    usb_checkout: str | None = None  # usb: the verified checkout to import USB (semilearn) from


def write_spec(run_dir: Path, spec: RunSpec, files: RunFiles) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"spec": spec.to_dict(), "spec_hash": spec.hash(), **dataclasses.asdict(files)}
    path = run_dir / SPEC_FILE
    write_json_atomic(path, payload)
    return path


def read_spec(path: Path) -> tuple[RunSpec, RunFiles]:
    payload = read_json(path, "run spec")
    try:
        spec = RunSpec.from_dict(payload["spec"])
        files = RunFiles(**{f.name: payload[f.name] for f in dataclasses.fields(RunFiles) if f.name in payload})
    except (KeyError, TypeError) as e:
        raise ValueError(f"run spec {path} is not a run spec file ({type(e).__name__}: {e})") from None
    if payload.get("spec_hash") not in (None, spec.hash()):
        raise ValueError(f"run spec {path}: stored hash {payload['spec_hash']} != recomputed {spec.hash()} "
                         "(edited by hand?)")
    return spec, files
