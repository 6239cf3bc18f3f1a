"""run_all.py's command line: the dry-run plan and one clear line for each bad input."""
import json
import subprocess
import sys

import pytest

from contract.spec import SETTING_FIELDS

from conftest import REPO


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "run_all.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_every_override_flag_is_a_spec_setting():
    from harness.cli import build_parser

    dests = {a.dest for g in build_parser()._action_groups if g.title.startswith("overrides") for a in g._group_actions}
    assert dests == set(SETTING_FIELDS)


def test_dry_run_prints_plan_and_writes_only_splits(shared_archive, cifar, tmp_path):
    out = tmp_path / "res"
    r = run_cli("--budgets", "40", "250", "4000", "--dry-run", "--data", str(shared_archive), "--out", str(out),
                "--preset", "smoke", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "train per class [5000, 5000" in r.stdout
    assert sorted(p.name for p in (out / "splits").iterdir()) == [
        "cifar10-250-seed0.json", "cifar10-40-seed0.json", "cifar10-4000-seed0.json"]
    assert sorted(p.name for p in out.iterdir()) == ["splits"]
    for n in (40, 250, 4000):
        sha = json.loads((out / "splits" / f"cifar10-{n}-seed0.json").read_text())["sha256"]
        assert f"sha256 {sha}" in r.stdout
    plan_lines = [line for line in r.stdout.splitlines() if "hash=" in line]
    assert len(plan_lines) == 6 and sum("torchssl" in line for line in plan_lines) == 3
    assert "JPEG quality 75 image files: lossy" in r.stdout  # the data source says how it stores pixels


def test_paper_preset_evaluates_every_1024_steps_and_recipes_multiply_ours(shared_archive, cifar, tmp_path):
    r = run_cli("--budgets", "40", "--dry-run", "--data", str(shared_archive), "--out", str(tmp_path / "o"),
                "--preset", "paper", "--device", "cpu", "--recipes", "paper", "torchssl")
    assert r.returncode == 0, r.stderr
    plan_lines = [line.split() for line in r.stdout.splitlines() if "hash=" in line]
    assert [(p[0], p[1]) for p in plan_lines] == [("own", "paper"), ("own", "torchssl"), ("torchssl", "torchssl")]
    assert all("eval_every=1024" in p and "steps=1048576" in p for p in plan_lines)


@pytest.mark.parametrize("args, message", [
    (["--budgets", "45"], "label budget 45 is not accepted: it must be a positive multiple of 10"),
    (["--budgets", "0"], "label budget 0 is not accepted"),
    (["--budgets", "60000"], "label budget 60000 is not accepted: it needs 6000 images per class"),
    (["--impls", "mixmatch"], "argument --impls: invalid choice: 'mixmatch'"),
    (["--algorithms", "remixmatch"], "argument --algorithms: invalid choice: 'remixmatch' (choose from 'fixmatch', "
                                     "'mixmatch')"),
    (["--algorithms", "mixmatch", "mixmatch"], "--algorithms mixmatch mixmatch repeats a value"),
    (["--mixup-alpha", "0.75"], "--mixup-alpha is a mixmatch setting, and --algorithms fixmatch runs no mixmatch"),
    (["--algorithms", "mixmatch", "--threshold", "0.9"], "--threshold is a fixmatch setting, and --algorithms "
                                                        "mixmatch runs no fixmatch"),
    (["--algorithms", "mixmatch", "--temperature", "0"], "invalid mixmatch run spec: temperature must be positive"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--device", "tpu"], "--device 'tpu' is not accepted; accepted: auto, cpu, cuda, cuda:N"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--steps", "0"], "steps must be a positive integer, got 0"),
    (["--lr", "-1"], "lr must be positive, got -1.0"),
    (["--seeds", "-1"], "--seeds -1 is not accepted; seeds are integers in 0..4294967295"),
    (["--seeds", str(2**32)], f"--seeds {2**32} is not accepted"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lambda-u", "nan"], "lambda_u must be a finite number, got nan"),
    (["--impls", "own", "own"], "--impls own own repeats a value"),
    (["--recipes", "official"], "argument --recipes: invalid choice: 'official'"),
    (["--bn-momentum", "0"], "bn_momentum must lie in (0, 1], got 0.0"),
    (["--eval-subset", "20000"], "--eval-subset 20000 is more than the 10000 test images"),
])
def test_bad_flags_fail_with_one_clear_line(tmp_path, shared_archive, args, message):
    r = run_cli(*args, "--dry-run", "--data", str(shared_archive), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "o" / "runs").exists()


def test_missing_data_path_is_one_line(tmp_path):
    r = run_cli("--dry-run", "--data", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: data path {tmp_path / 'missing.tar.gz'} does not exist; expected a torchvision CIFAR-10 folder "
        "(containing cifar-10-batches-py), the original cifar-10-python.tar.gz, an image-folder tree laid out "
        "train/<class>/* and test/<class>/*, or a .tar/.tar.gz of such a tree"]


def test_unreachable_torchssl_source_is_one_line(shared_archive, tmp_path):
    r = run_cli("--budgets", "40", "--preset", "smoke", "--device", "cpu", "--data", str(shared_archive),
                "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "cache"),
                "--torchssl-source", str(tmp_path / "no-such-repo"), "--no-warmup")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot clone TorchSSL from") and "TORCHSSL_SOURCE" in lines[0]
    assert not list((tmp_path / "o").glob("runs/*/result.json"))


def test_both_algorithms_are_planned_with_their_own_defaults(shared_archive, cifar, tmp_path):
    """--algorithms fixmatch mixmatch: each with its defaults (MixMatch: TorchSSL's config), the same splits, a
    setting of one algorithm given by flag reaching its runs only, and FixMatch's runs named as without MixMatch."""
    common = ["--budgets", "40", "--dry-run", "--data", str(shared_archive), "--preset", "paper", "--device", "cpu"]
    r = run_cli(*common, "--out", str(tmp_path / "a"), "--algorithms", "fixmatch", "mixmatch", "--threshold", "0.9",
                "--ramp-up", "0.25")
    assert r.returncode == 0, r.stderr
    alone = run_cli(*common, "--out", str(tmp_path / "b"), "--threshold", "0.9")
    plan = [line.split() for line in r.stdout.splitlines() if "hash=" in line]
    assert [(p[0], p[2]) for p in plan] == [("own", "fixmatch"), ("torchssl", "fixmatch"), ("own", "mixmatch"),
                                            ("torchssl", "mixmatch")]
    assert [p for p in plan if p[2] == "fixmatch"] == [
        [w.replace("/b/", "/a/") for w in line.split()] for line in alone.stdout.splitlines() if "hash=" in line]
    assert all("mu=1" in p and "B=64" in p and "steps=1048576" in p for p in plan if p[2] == "mixmatch")
    assert all("mu=7" in p for p in plan if p[2] == "fixmatch")
    # the split printed once, shared by both algorithms' runs
    assert sum(line.startswith("split:") for line in r.stdout.splitlines()) == 1


def test_presets_hold_each_algorithms_defaults_and_flags_reach_their_algorithm_only():
    from harness.plan import preset_values

    flags = {"threshold": 0.9, "ramp_up": 0.25, "steps": 100, "lambda_u": 75.0}
    fix, mix = (preset_values("smoke", flags, a) for a in ("fixmatch", "mixmatch"))
    assert (fix["threshold"], fix["uratio"], fix["steps"], fix["lambda_u"]) == (0.9, 2, 100, 75.0)
    assert "ramp_up" not in fix and "mixup_alpha" not in fix  # RunSpec's None
    # TorchSSL's CIFAR-10 MixMatch config, with the smoke preset's run size and the flags that apply
    assert (mix["threshold"], mix["uratio"], mix["mixup_alpha"], mix["temperature"], mix["ramp_up"]) == \
        (None, 1, 0.5, 0.5, 0.25)
    assert (mix["steps"], mix["batch_size"], mix["lambda_u"]) == (100, 4, 75.0)
    paper = preset_values("paper", {}, "mixmatch")
    assert (paper["lambda_u"], paper["ramp_up"], paper.get("batch_size", 64)) == (100.0, 0.4, 64)
