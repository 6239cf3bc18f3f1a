"""Label splits (balanced, deterministic, never overwritten) and run specs (stable hash, validation)."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from contract.arrays import indices_sha256, load_split
from contract.spec import ALGORITHM_SETTINGS, ALGORITHMS, RunFiles, RunSpec, read_spec, write_spec
from harness.splits import SplitError, ensure_split, make_split

from conftest import REPO

LABELS = np.repeat(np.arange(10), 5000)[np.random.default_rng(1).permutation(50000)]


@pytest.mark.parametrize("n", [40, 250, 4000])
def test_split_is_balanced_unique_and_in_range(n):
    idx = make_split(LABELS, n, seed=0)
    assert len(idx) == n == len(set(idx.tolist()))
    assert np.bincount(LABELS[idx], minlength=10).tolist() == [n // 10] * 10
    assert idx.min() >= 0 and idx.max() < 50000 and (np.diff(idx) > 0).all()


def test_split_depends_on_seed_and_not_on_global_rng():
    np.random.seed(123)
    a = make_split(LABELS, 250, seed=0)
    np.random.seed(999)
    b = make_split(LABELS, 250, seed=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_split(LABELS, 250, seed=1))


def test_split_is_the_same_in_another_process():
    code = ("import numpy as np; from harness.splits import make_split; from contract.arrays import indices_sha256;"
            "y = np.repeat(np.arange(10), 5000)[np.random.default_rng(1).permutation(50000)];"
            "print(indices_sha256(make_split(y, 250, 3)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == indices_sha256(make_split(LABELS, 250, 3))


@pytest.mark.parametrize("bad, message", [(45, "positive multiple of 10"), (0, "positive multiple of 10"),
                                          (-10, "positive multiple of 10"), (60000, "needs 6000 images per class")])
def test_bad_budgets_are_refused(bad, message):
    with pytest.raises(SplitError, match=f"label budget {bad} is not accepted: .*{message}"):
        make_split(LABELS, bad, seed=0)


def test_split_file_written_once_verified_and_never_overwritten(tmp_path):
    path, sha = ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "d" * 64)
    assert path.name == "cifar10-40-seed0.json"
    np.testing.assert_array_equal(load_split(path, sha), make_split(LABELS, 40, 0))
    before = path.read_bytes()
    assert ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "d" * 64) == (path, sha)
    assert path.read_bytes() == before
    # A file holding another split (here: the seed-1 draw) is an error and stays untouched.
    other = json.loads(path.read_text())
    other["labeled_indices"] = make_split(LABELS, 40, 1).tolist()
    other["sha256"] = indices_sha256(other["labeled_indices"])
    path.write_text(json.dumps(other))
    with pytest.raises(SplitError, match="never overwritten"):
        ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "d" * 64)
    assert json.loads(path.read_text())["sha256"] == other["sha256"]


def test_split_file_from_other_data_is_refused(tmp_path):
    ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "a" * 64)
    with pytest.raises(SplitError, match="was drawn on data aaaaaaaaaaaa"):
        ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "b" * 64)


def test_tampered_split_file_is_detected_by_readers(tmp_path):
    path, sha = ensure_split(tmp_path, "cifar10", LABELS, 40, 0, "a" * 64)
    payload = json.loads(path.read_text())
    payload["labeled_indices"][0] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="is corrupt"):
        load_split(path)


def _spec(**kw):
    base = dict(impl="own", n_labels=250, seed=0, data_kind="image-folder-tar", data_sha256="a" * 64,
                split_sha256="b" * 64)
    return RunSpec(**{**base, **kw})


def test_spec_hash_is_stable_across_processes():
    code = ("from contract.spec import RunSpec; print(RunSpec(impl='own', n_labels=250, seed=0, "
            "data_kind='image-folder-tar', data_sha256='a'*64, split_sha256='b'*64).hash())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "7", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == _spec().hash()


MIXMATCH = dict(algorithm="mixmatch", threshold=None, mixup_alpha=0.5, temperature=0.5, ramp_up=0.4)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_spec_hash_changes_with_every_field_of_the_algorithm(algorithm):
    base = _spec(**(MIXMATCH if algorithm == "mixmatch" else {}))
    changed = {"impl": "torchssl", "recipe": "torchssl", "n_labels": 40, "seed": 1, "data_kind": "torchvision",
               "data_sha256": "c" * 64, "split_sha256": "d" * 64, "dataset": "cifar10x", "num_classes": 5,
               "precision": "bf16", "algorithm": "fixmatch" if algorithm == "mixmatch" else "mixmatch"}
    foreign = {n for a, names in ALGORITHM_SETTINGS.items() if a != algorithm for n in names}
    hashes = {base.hash()}
    fields = [f for f in dataclasses.fields(RunSpec) if f.name not in foreign]
    for f in fields:
        v = getattr(base, f.name)
        if f.name in changed:
            new = changed[f.name]
        elif isinstance(v, bool):
            new = not v
        elif isinstance(v, int):
            new = v + 10 if f.name != "depth" else 34
        else:
            new = v / 2
        also = {"recipe": "torchssl"} if f.name == "impl" else {}  # TorchSSL runs only its own recipe
        if f.name == "algorithm":  # the other algorithm's own settings, and none of this one's
            also = {n: None for n in ALGORITHM_SETTINGS[algorithm]}
            also.update(MIXMATCH if new == "mixmatch" else {"threshold": 0.95})
            also.pop("algorithm", None)
        hashes.add(dataclasses.replace(base, **{f.name: new}, **also).hash())
    assert len(hashes) == len(fields) + 1


def test_fixmatch_specs_hash_as_before_mixmatch_existed():
    """Hashes computed by the code before the MixMatch settings were added: a FixMatch run keeps its name, so its
    finished results are found and its checkpoints resumed."""
    assert _spec().hash() == "ba4b09f2cf6c"
    assert _spec(impl="torchssl", recipe="torchssl", n_labels=40, seed=3, steps=48, eval_every=12, batch_size=4,
                 uratio=2, eval_subset=1000, eval_batch_size=500, checkpoint_every=24, log_every=4).hash() == \
        "98ef53d77b0d"
    assert _spec(recipe="torchssl", n_labels=4000, seed=1, threshold=0.9, lambda_u=2.0,
                 precision="bf16").hash() == "36b7dedcb1f4"
    assert _spec(**MIXMATCH).hash() != _spec().hash()


def test_algorithm_settings_belong_to_their_algorithm():
    with pytest.raises(ValueError, match="mixup_alpha must be set for mixmatch runs"):
        _spec(algorithm="mixmatch", threshold=None, temperature=0.5, ramp_up=0.4)
    with pytest.raises(ValueError, match="threshold is a fixmatch setting; it must be None for mixmatch runs"):
        _spec(**{**MIXMATCH, "threshold": 0.95})
    with pytest.raises(ValueError, match="temperature is a mixmatch setting; it must be None for fixmatch runs"):
        _spec(temperature=0.5)
    with pytest.raises(ValueError, match="threshold must be set for fixmatch runs"):
        _spec(threshold=None)
    with pytest.raises(ValueError, match="ramp_up must lie in \\[0, 1\\]"):
        _spec(**{**MIXMATCH, "ramp_up": 1.5})
    with pytest.raises(ValueError, match="mixup_alpha must be positive"):
        _spec(**{**MIXMATCH, "mixup_alpha": 0.0})
    with pytest.raises(ValueError, match="algorithm 'remixmatch' is not one of"):
        _spec(algorithm="remixmatch")
    spec = _spec(**MIXMATCH, uratio=1, batch_size=64)
    assert spec.name.startswith("cifar10-mixmatch-250-seed0-own-paper-")
    # B labelled + K muB mixed through the trained passes, K muB through the label guessing: 64 * (1 + 4)
    assert spec.images_per_step == 320 and _spec(uratio=1, batch_size=64).images_per_step == 192


def test_spec_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="label budget 45 is not accepted: it must be a positive multiple of 10"):
        _spec(n_labels=45)
    with pytest.raises(ValueError, match="impl 'fixmatch' is not one of"):
        _spec(impl="fixmatch")
    with pytest.raises(ValueError, match="depth must be 6n\\+4, got 27"):
        _spec(depth=27)
    with pytest.raises(ValueError, match="recipe 'official' is not one of"):
        _spec(recipe="official")
    with pytest.raises(ValueError, match="torchssl runs its own recipe only"):
        _spec(impl="torchssl", recipe="paper")
    with pytest.raises(ValueError, match="bn_momentum must lie in"):
        _spec(bn_momentum=0.0)


def test_spec_file_round_trip_and_tamper_check(tmp_path):
    spec = _spec(steps=10)
    path = write_spec(tmp_path, spec, RunFiles(data_dir="/d", split_file="/s.json", device="cpu"))
    again, files = read_spec(path)
    assert again == spec and files.device == "cpu" and files.split_file == "/s.json"
    payload = json.loads(path.read_text())
    payload["spec"]["steps"] = 11
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="edited by hand"):
        read_spec(path)
