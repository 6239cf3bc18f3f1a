"""Shared fixtures: the real CIFAR-10 archive, its cached arrays, and ready-made run folders; and the helpers
several test files use (imported as `from conftest import ...`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cuda_param():
    """The "cuda" value of a device parametrization, skipped where there is no CUDA device (torch imported here,
    on first use, so that tests without torch stay quick)."""
    import torch

    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


def run_module(module: str, run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m MODULE --spec RUN_DIR/spec.json --run-dir RUN_DIR *extra` from the repository root, captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, "--spec", str(run_dir / "spec.json"), "--run-dir",
                           str(run_dir), *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def copy_run(run_dir: Path, to: Path) -> Path:
    """A second folder holding the same spec.json (same spec, same hash)."""
    to.mkdir(parents=True)
    shutil.copy(run_dir / "spec.json", to / "spec.json")
    return to


def wrn_count_by_hand(depth: int = 28, k: int = 2, classes: int = 10) -> tuple[int, int]:
    """(all parameters, those under weight decay) of a WRN with conv biases (as TorchSSL builds it, and own_impl),
    read off the architecture."""
    conv = lambda c_in, c_out, ks: (c_in * c_out * ks * ks + c_out, c_in * c_out * ks * ks)  # noqa: E731
    bn = lambda c: (2 * c, 0)  # noqa: E731
    parts = [conv(3, 16, 3)]
    c_in = 16
    for width in (16 * k, 32 * k, 64 * k):
        for i in range((depth - 4) // 6):
            c = c_in if i == 0 else width
            parts += [bn(c), conv(c, width, 3), bn(width), conv(width, width, 3)]
            if c != width:
                parts.append(conv(c, width, 1))
        c_in = width
    parts += [bn(c_in), (c_in * classes + classes, c_in * classes)]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def shared_archive_path() -> Path:
    """The JPEG CIFAR-10 archive: $FIXMATCH_BENCH_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("FIXMATCH_BENCH_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    path = shared_archive_path()
    if not path.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {path} (set FIXMATCH_BENCH_DATA to its path)")
    return path


@pytest.fixture(scope="session")
def cifar(shared_archive):
    """The real data set, decoded once into the user cache (FIXMATCH_BENCH_CACHE) and reused."""
    from harness.data import load_cifar10

    return load_cifar10(shared_archive)


@pytest.fixture(scope="session")
def cifar_data_dir(cifar) -> Path:
    return cifar.data_dir


@pytest.fixture
def make_run_dir(cifar, tmp_path):
    """make_run_dir(impl, n_labels=40, seed=0, device="cpu", extra=None, **spec_overrides) -> run folder."""
    from contract.spec import RunFiles, RunSpec, write_spec
    from harness.splits import ensure_split

    def make(impl: str, n_labels: int = 40, seed: int = 0, device: str = "cpu", extra: dict | None = None,
             **overrides):
        split_file, split_sha = ensure_split(tmp_path, "cifar10", cifar.train_y, n_labels, seed,
                                             cifar.identity.data_sha256)
        values = dict(steps=3, eval_every=3, batch_size=2, uratio=2, eval_subset=100, eval_batch_size=100,
                      checkpoint_every=3, log_every=1)
        values.update(overrides)
        spec = RunSpec(impl=impl, n_labels=n_labels, seed=seed, data_kind=cifar.identity.kind,
                       data_sha256=cifar.identity.data_sha256, split_sha256=split_sha, **values)
        run_dir = tmp_path / "runs" / spec.name
        write_spec(run_dir, spec, RunFiles(data_dir=str(cifar.data_dir), split_file=str(split_file),
                                           device=device, extra=extra or {}))
        return run_dir

    return make


@pytest.fixture(scope="session")
def torchssl_checkout() -> Path:
    """The cached verified TorchSSL checkout, else one cloned from $TORCHSSL_SOURCE; else skip with the reason."""
    from third_party.torchssl import checkout as co

    found = co.find_checkout()  # a modified cached checkout fails here, with what to do
    if found is not None:
        return found
    if os.environ.get(co.SOURCE_ENV):
        return co.ensure_checkout(os.environ[co.SOURCE_ENV])
    pytest.skip(f"no TorchSSL checkout: none cached at {co.checkout_path()} and {co.SOURCE_ENV} is not set "
                f"(set it to a git URL or a local clone/mirror of TorchSSL)")
