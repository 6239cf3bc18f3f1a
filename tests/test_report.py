"""The report: numbers worked out by hand from result files written here, the mismatch check, the figures."""
import json

import pytest

from contract.arrays import indices_sha256
from contract.results import append_metrics, summarize_evals, write_json_atomic
from contract.spec import RunFiles, RunSpec, write_spec
from harness.report import write_report


def fake_run(out, impl, n, seed, final, best, evals_top1, *, steps=100, split="s", data="d", sps=2.0, wall=50.0):
    """A finished run whose files agree (harness/verify.py checks them): evaluations spread evenly over `steps`,
    ending at the last step; a split file per letter `split`; final and best as the evaluations give them."""
    indices = [ord(split) * 100 + i for i in range(n)]
    split_file = out / "splits" / f"cifar10-{n}-seed{seed}-{split}.json"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(split_file, {"labeled_indices": indices, "sha256": indices_sha256(indices)})
    spec = RunSpec(impl=impl, n_labels=n, seed=seed, data_kind="image-folder-tar", data_sha256=data * 64,
                   split_sha256=indices_sha256(indices), steps=steps, eval_every=steps // len(evals_top1))
    run_dir = out / "runs" / spec.name
    write_spec(run_dir, spec, RunFiles(data_dir="/d", split_file=str(split_file)))
    evals = [{"kind": "eval", "step": spec.eval_every * (i + 1), "top1": a, "top5": 99.0, "loss": 0.5}
             for i, a in enumerate(evals_top1)]
    for e in evals:
        append_metrics(run_dir, {"kind": "train", "step": e["step"], "mask_rate": 0.5, "pseudo_acc": 0.9})
        append_metrics(run_dir, e)
    summary = summarize_evals(evals)
    assert (summary["final_top1"], summary["best_top1"]) == (final, best)
    write_json_atomic(run_dir / "result.json", {
        "impl": impl, "n_labels": n, "seed": seed, "steps": steps, "spec_hash": spec.hash(), **summary,
        "split_sha256": spec.split_sha256, "data_sha256": data * 64, "data_kind": "image-folder-tar",
        "param_count": 1, "wall_seconds": wall, "steps_per_second": sps, "device": "cpu", "torch_version": "x",
        "code_version": "c", "evals": evals})
    return run_dir


def row(text, n, impl_name):
    return next(line for line in text.splitlines() if line.startswith(f"| {n} | {impl_name} |"))


def test_table_mean_std_over_seeds_worked_by_hand(tmp_path):
    # ours, 40 labels: final 50 and 60 -> mean 55, sample std sqrt(((5)^2 + (5)^2) / 1) = 7.07
    fake_run(tmp_path, "own", 40, 0, 50.0, 52.0, [52.0, 50.0], split="a")
    fake_run(tmp_path, "own", 40, 1, 60.0, 61.0, [61.0, 60.0], split="b")
    fake_run(tmp_path, "torchssl", 40, 0, 40.0, 41.0, [41.0, 40.0], split="a", sps=1.0, wall=100.0)
    fake_run(tmp_path, "torchssl", 40, 1, 44.0, 47.0, [47.0, 44.0], split="b", sps=1.0, wall=100.0)
    text = write_report(tmp_path).read_text()
    ours = row(text, 40, "ours (own_impl)")
    assert "| 55.00 ± 7.07 (n=2) |" in ours and "| 56.50 ± 6.36 (n=2) |" in ours  # best: 52, 61
    assert "| 2.00 | yes |" in ours and "| 50 s |" in ours
    theirs = row(text, 40, "TorchSSL")
    assert "| 42.00 ± 2.83 (n=2) |" in theirs and "| 44.00 ± 4.24 (n=2) |" in theirs
    assert "MISMATCH" not in text
    assert "chosen on the test set" in text and "median of the last 20 evaluations" in text
    assert (tmp_path / "figures" / "curves-40.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "throughput.png").exists()
    assert "![40 labels" in text


def test_mismatched_split_is_loud_and_excluded(tmp_path):
    fake_run(tmp_path, "own", 250, 0, 81.0, 81.0, [81.0], split="a")
    fake_run(tmp_path, "torchssl", 250, 0, 71.0, 71.0, [71.0], split="z")  # another split: not comparable
    fake_run(tmp_path, "own", 250, 1, 90.0, 90.0, [90.0], split="b")
    fake_run(tmp_path, "torchssl", 250, 1, 85.0, 85.0, [85.0], split="b")
    text = write_report(tmp_path).read_text()
    assert "MISMATCHED RUNS" in text and "250 labels, seed 0: the implementations differ in split_sha256" in text
    ours = row(text, 250, "ours (own_impl)")
    assert "| 90.00 (n=1) |" in ours and "MISMATCH on 1 seed(s), excluded" in ours  # seed 0 left out


def test_step_budget_mismatch_is_detected(tmp_path):
    fake_run(tmp_path, "own", 40, 0, 50.0, 50.0, [50.0], steps=100)
    run = fake_run(tmp_path, "torchssl", 40, 0, 50.0, 50.0, [50.0], steps=100)
    res = json.loads((run / "result.json").read_text())
    res["steps"] = 101  # TorchSSL's loop runs one step too many unless stopped
    write_json_atomic(run / "result.json", res)
    text = write_report(tmp_path).read_text()
    assert "RUN(S) WHOSE FILES DO NOT CHECK OUT" in text
    assert f"{run / 'result.json'}: steps 101 is not spec.json's 100" in text
    assert "| 40 | TorchSSL |" not in text  # excluded from the table


def test_empty_results_folder(tmp_path):
    assert "No finished runs yet" in write_report(tmp_path).read_text()


@pytest.mark.parametrize("impls", [("own",), ("own", "torchssl")])
def test_report_only_cli(tmp_path, impls):
    import subprocess
    import sys
    from pathlib import Path

    for impl in impls:
        fake_run(tmp_path, impl, 4000, 0, 93.0, 94.0, [94.0, 93.0])
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "run_all.py", "--report-only", "--out", str(tmp_path)], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 4000 | ours (own_impl) | 93.00 (n=1) |" in text
    assert ("| yes |" in text) == (len(impls) == 2)
