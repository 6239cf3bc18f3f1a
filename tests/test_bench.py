"""The benchmark scripts' own logic: which TorchSSL loaders the throughput measures, the compile a benchmark asks of
ours, and how the GPU check's summary finds the lines that confirm each point."""
import json
import subprocess
import sys

from contract.spec import RunSpec, read_spec

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402
import throughput  # noqa: E402


def test_torchssl_is_measured_as_shipped_and_with_a_loader_process_per_core():
    # 1 labelled + 4 unlabelled loader processes per num_workers: 16 cores hold 3 of them (15 processes)
    assert throughput.torchssl_worker_counts(None, 16) == [1, 3]
    assert throughput.torchssl_worker_counts(None, 64) == [1, 12]
    assert throughput.torchssl_worker_counts(None, 2) == [1]  # as shipped already fills 2 cores: one run
    assert throughput.torchssl_worker_counts([4, 4, 1], 16) == [4, 1]  # as asked, each once


def test_every_test_the_gpu_check_names_exists():
    """A renamed or re-parametrised test would make its stage a usage error (pytest exit 4) on the GPU."""
    nodes = [*gpu_check.QUICK_TESTS, *gpu_check.COMPILE_TESTS]
    assert {n for _, claim in gpu_check.TEST_CLAIMS for n in claim} <= set(nodes)
    found = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *nodes], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stdout[-2000:] + found.stderr[-2000:]
    assert [line for line in found.stdout.splitlines() if "::" in line] == nodes


def test_a_benchmark_run_compiles_ours_without_binding_it(cifar, tmp_path):
    """Unasked, a benchmark compiles ours as a paper-length run would, and spec.json says the compile is not
    binding (a failure falls back to eager: tests/test_own_train.py); --compile / --no-compile bind."""
    from harness.plan import PlannedRun
    from harness.launch import prepare
    from harness.splits import ensure_split

    split_file, split_sha = ensure_split(tmp_path, "cifar10", cifar.train_y, 40, 0, cifar.identity.data_sha256)
    spec = RunSpec(impl="own", n_labels=40, seed=0, data_kind=cifar.identity.kind,
                   data_sha256=cifar.identity.data_sha256, split_sha256=split_sha, steps=4)
    for asked, want in ((None, (True, False)), (True, (True, True)), (False, (False, True))):
        ctx = throughput.common.run_context(cifar, ["own"], None, asked)
        run = PlannedRun(spec, tmp_path / f"run-{asked}", split_file)
        prepare(run, ctx, "cpu")
        _, files = read_spec(run.run_dir / "spec.json")
        assert (files.compile, files.compile_binding) == want, asked


def test_summary_cites_the_lines_that_confirm_each_point(tmp_path):
    node = gpu_check.TEST_CLAIMS[1][1][0]  # float32 logits under bf16
    lines = ["python 3.11 | torch 2.11", "gpu NVIDIA H200 capability (9, 0) count 1",
             f"{node} PASSED                   [ 40%]",
             f"{gpu_check.QUICK_TESTS[0]} FAILED [ 20%]",
             "B=64  mu=7 bf16-cl-compile     9.000 steps/s (fastest 9.1)  compile 41.5 s",
             "own             12.000     12.0,12.1     1%    1.000   10.0%  compiled in 3.2 s",
             "torchssl-w1      2.000      2.0,2.0     60%    0.100    1.0%  5 (num_workers 1, as shipped)",
             "torchssl-w3      4.000      4.0,4.0     20%    0.200    2.0%  15 (num_workers 3)"]
    (tmp_path / "throughput.json").write_text(json.dumps({"precision": "bf16", "impls": {
        "own": {"steps_per_second": 12.0, "achieved_tflops": 1.0, "data_frac": 0.01, "num_workers": None}},
        "speedups_own_over": {"torchssl-w1": 6.0, "torchssl-w3": 3.0}}))
    text = gpu_check.summary("cuda", tmp_path, lines, ["environment: ok, 3 s"], [], 100.0)
    assert "Environment: python 3.11 | torch 2.11; gpu NVIDIA H200" in text and "- environment: ok, 3 s" in text
    assert f"**PASSED** `{node}` (check.log line 3)" in text
    assert f"**FAILED** `{gpu_check.QUICK_TESTS[0]}` (check.log line 4)" in text
    assert f"**not run** `{gpu_check.COMPILE_TESTS[0]}`" in text
    assert "check.log line 7: `torchssl-w1" in text and "check.log line 8: `torchssl-w3" in text
    assert "check.log line 5: `B=64" in text and "check.log line 6: `own" in text
    assert "bf16 speedup own/torchssl-w3: 3.00" in text
    assert all(claim in text for claim, _ in gpu_check.TEST_CLAIMS)


def test_throughput_runs_both_implementations_end_to_end(shared_archive, cifar, torchssl_checkout, tmp_path):
    """The throughput script as the GPU check calls it, tiny: both implementations run and the ratio is printed."""
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--device", "cpu", "--data", str(shared_archive),
                           "--batch-size", "2", "--uratio", "1", "--depth", "10", "--widen-factor", "1",
                           "--warmup", "1", "--window", "1", "--repeats", "1", "--no-compile", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {r["impl"] for r in report["impls"].values()} == {"own", "torchssl"}
    assert proc.stdout.strip().splitlines()[-1].startswith("speedup own/torchssl: ")
