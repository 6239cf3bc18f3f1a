"""Shared fixtures: the real CIFAR-10 archive, its cached arrays, and ready-made run folders; and the helpers
several test files use (imported as `from conftest import ...`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
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


def as_in_a_terminal() -> None:
    """A child's preexec_fn: SIGINT and SIGHUP handled by default, as a terminal's job gets them (a test suite
    started in the background, or under nohup, passes them on ignored, and Python then never sees Ctrl-C)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def run_identity(tmp_path: Path, spec_dir: Path, *flags: str, timeout: float = 300
                 ) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m identity --spec SPEC_DIR/spec.json --out TMP/identity.json *flags`, captured; its JSON or {}."""
    import json

    out = tmp_path / "identity.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "identity", "--spec", str(spec_dir / "spec.json"), "--out", str(out),
                           *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else {})


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.1):
    """condition()'s first true value within `timeout` seconds; fails naming `what`, and early (with the end of
    its stderr, where piped) if `proc` ends first."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = proc.stderr.read()[-3000:] if proc.stderr else ""
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}: {tail}")
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}")


def torchssl_checkpoint(run_dir: Path) -> dict:
    """TorchSSL's resume checkpoint in a run folder, on the CPU."""
    import torch

    return torch.load(run_dir / "torchssl" / "latest_model.pth", map_location="cpu", weights_only=True)


def reference_result_on_our_split(run_dir: Path, entry: str) -> tuple:
    """Run a reference's entry module on a prepared run folder and check what every result owes the spec: our schema,
    our split (its checksum recomputed), our data and the spec's hash. Returns (spec, files, result)."""
    import json

    from contract.arrays import indices_sha256
    from contract.results import RESULT_KEYS
    from contract.spec import read_spec

    spec, files = read_spec(run_dir / "spec.json")
    proc = run_module(entry, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert set(RESULT_KEYS) <= set(result)
    split = json.loads(Path(files.split_file).read_text())
    assert result["split_sha256"] == split["sha256"] == indices_sha256(split["labeled_indices"]) == spec.split_sha256
    assert result["data_sha256"] == spec.data_sha256 and result["spec_hash"] == spec.hash()
    return spec, files, result


def torchssl_result_on_our_split(run_dir: Path) -> tuple:
    """reference_result_on_our_split for TorchSSL, and its pinned clean checkout and the WideResNet-28-2's parameter
    count. Returns (spec, result)."""
    from third_party.torchssl import checkout as co

    spec, _, result = reference_result_on_our_split(run_dir, "third_party.torchssl.entry")
    assert result["param_count"] == wrn_count_by_hand(28, 2, 10)[0] == 1_469_642
    assert result["torchssl_commit"] == co.COMMIT and result["torchssl_checkout_clean"] is True
    return spec, result


def flat(text: str) -> str:
    """Markdown table lines with the padding tabulate adds taken out: '| a | b |', an empty cell '| |'."""
    def cells(line: str) -> str:
        return "|" + "|".join(f" {c.strip()} " if c.strip() else " " for c in line.strip()[1:-1].split("|")) + "|"

    return "\n".join(cells(line) if line.startswith("|") else line for line in text.splitlines())


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


def randomize_batchnorm(model, seed: int, var_scale: float = 1.0, var_shift: float = 0.5) -> None:
    """BatchNorm affine values and running statistics made non-trivial (weight near 1, bias and mean near 0, var in
    [var_shift, var_shift + var_scale)), so that a misplaced tensor, or an eps, shows in the outputs."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1 if t is m.weight else 0))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * var_scale + var_shift)


def to_tensor(images):
    """(N, H, W, 3) uint8 numpy -> (N, 3, H, W) uint8 tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def to_numpy(x):
    """(N, 3, H, W) tensor -> (N, H, W, 3) numpy."""
    return x.permute(0, 2, 3, 1).numpy()


def assert_same_images(got, want, what: str):
    """Two uint8 image stacks (N, H, W, 3) equal pixel for pixel; else say how many pixels and images differ."""
    import numpy as np

    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8
    differs = np.any(got != want, axis=-1)
    assert not differs.any(), (f"{what}: {differs.mean():.4%} of pixels differ, in {differs.any((1, 2)).sum()} "
                               f"images, max abs diff {np.abs(got.astype(int) - want.astype(int)).max()}")


@contextmanager
def checkout_modules(checkout: Path, *names: str, within=None):
    """Modules `names` imported from a checkout (inside the context `within`, e.g. USB's import stand-ins), with no
    bytecode read from it or written; sys.path, the bytecode settings and sys.modules are restored afterwards, so
    none of the checkout's packages (TorchSSL's datasets, models, ...; semilearn) outlives the caller."""
    checkout = Path(checkout).resolve()
    saved, before = (list(sys.path), sys.dont_write_bytecode, sys.pycache_prefix), set(sys.modules)
    with within or nullcontext():
        sys.dont_write_bytecode, sys.pycache_prefix = True, str(Path(os.devnull) / "no-bytecode")
        sys.path.insert(0, str(checkout))
        try:
            modules = [importlib.import_module(name) for name in names]
            for module in modules:
                assert Path(module.__file__).resolve().is_relative_to(checkout), module.__file__
            yield modules
        finally:
            sys.path[:], sys.dont_write_bytecode, sys.pycache_prefix = saved
            for name in set(sys.modules) - before:
                top = name.split(".")[0]
                if (checkout / top).is_dir() or (checkout / f"{top}.py").is_file():
                    del sys.modules[name]


def torchssl_modules(checkout: Path, *names: str):
    """TorchSSL's modules `names`, imported for a while (checkout_modules)."""
    return checkout_modules(checkout, *names)


@pytest.fixture
def one_thread():
    """Small tensors on shared, busy cores: one torch thread is faster than several."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """make_run_dir(impl, n_labels=40, seed=0, device="cpu", files=None, **spec_overrides) -> run folder.
    files: RunFiles fields besides data_dir, split_file and device (e.g. compile, torchssl_checkout)."""
    from contract.spec import REFERENCES, RunFiles, RunSpec, write_spec
    from harness.splits import ensure_split

    def make(impl: str, n_labels: int = 40, seed: int = 0, device: str = "cpu", files: dict | None = None,
             **overrides):
        split_file, split_sha = ensure_split(tmp_path, "cifar10", cifar.train_y, n_labels, seed,
                                             cifar.identity.data_sha256)
        values = dict(steps=3, eval_every=3, batch_size=2, uratio=2, eval_subset=100, eval_batch_size=100,
                      checkpoint_every=3, log_every=1)
        values.update(overrides)
        values.setdefault("recipe", impl if impl in REFERENCES else "paper")
        spec = RunSpec(impl=impl, n_labels=n_labels, seed=seed, data_kind=cifar.identity.kind,
                       data_sha256=cifar.identity.data_sha256, split_sha256=split_sha, **values)
        run_dir = tmp_path / "runs" / spec.name
        write_spec(run_dir, spec, RunFiles(data_dir=str(cifar.data_dir), split_file=str(split_file),
                                           device=device, **(files or {})))
        return run_dir

    return make


def pinned_checkout(co) -> Path:
    """A pin's (third_party.<name>.checkout) cached verified checkout, else one cloned from its source variable;
    else skip with the reason."""
    from harness.env import default_cache_dir

    found = co.find_checkout(default_cache_dir())  # a modified cached checkout fails here, with what to do
    if found is not None:
        return found
    if os.environ.get(co.SOURCE_ENV):
        return co.ensure_checkout(os.environ[co.SOURCE_ENV], default_cache_dir())
    pytest.skip(f"no {co.PIN.name} checkout: none cached at {co.checkout_path(default_cache_dir())} and "
                f"{co.SOURCE_ENV} is not set (set it to a git URL or a local clone or mirror of {co.URL})")


@pytest.fixture(scope="session")
def torchssl_checkout() -> Path:
    from third_party.torchssl import checkout

    return pinned_checkout(checkout)


@pytest.fixture(scope="session")
def usb_checkout() -> Path:
    from third_party.usb import checkout

    return pinned_checkout(checkout)


def archive_images(archive: Path, per_class: int):
    """(10 per_class, 32, 32, 3) uint8: train images 0000.. of each class, decoded by PIL straight from the archive."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    picked = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and parts[0] == "train" and int(parts[2].split(".")[0]) < per_class:
                picked[member.name] = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                if len(picked) == 10 * per_class:
                    break
    assert len(picked) == 10 * per_class
    return np.stack([picked[name] for name in sorted(picked)])
