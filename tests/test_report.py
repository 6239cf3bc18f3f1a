"""The report: numbers worked out by hand from result files written here, pairing on common seeds, the paired
statistics and their intervals, the mismatch check, the figures."""
import json
import subprocess
import sys

import pytest

from contract.arrays import indices_sha256
from contract.results import append_metrics, summarize_evals, write_json_atomic
from contract.spec import RunFiles, RunSpec, write_spec
from harness.report import write_report
from harness.stats import paired, t975

from conftest import REPO, flat

ARM = {"own": ("own", "paper"), "own-tssl": ("own", "torchssl"), "torchssl": ("torchssl", "torchssl"),
       "own-usb": ("own", "usb"), "usb": ("usb", "usb")}


# MixMatch runs as the harness plans them: their own settings over the same protocol
MIXMATCH = dict(algorithm="mixmatch", threshold=None, mixup_alpha=0.5, temperature=0.5, ramp_up=0.4, uratio=1,
                lambda_u=100.0)
TRAIN_STATS = {"fixmatch": {"mask_rate": 0.5, "pseudo_acc": 0.9},
               "mixmatch": {"lambda_u": 50.0, "loss_u": 0.01, "guess_acc": 0.6}}


def fake_run(out, who, n, seed, evals_top1, *, steps=100, split="s", data="d", sps=2.0, wall=50.0,
             optimizer_steps=None, algorithm="fixmatch", **settings):
    """A finished run whose files agree (harness/verify.py checks them): evaluations spread evenly over `steps`,
    ending at the last step; a split file per letter `split`; final, median and best as the evaluations give them.
    Two evaluations [a, b] stand for the last two of ten, eight at 0 before them, so that the median's window (the
    last fifth of the evaluations: 2 of 10) is [a, b]: final b, median (a + b) / 2, best max(a, b).
    `settings`: spec values."""
    if len(evals_top1) == 2:
        evals_top1 = [0.0] * 8 + list(evals_top1)
    impl, recipe = ARM[who]
    indices = [ord(split) * 100 + i for i in range(n)]
    split_file = out / "splits" / f"cifar10-{n}-seed{seed}-{split}.json"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(split_file, {"labeled_indices": indices, "sha256": indices_sha256(indices)})
    spec = RunSpec(impl=impl, recipe=recipe, n_labels=n, seed=seed, data_kind="image-folder-tar",
                   data_sha256=data * 64, split_sha256=indices_sha256(indices), steps=steps,
                   eval_every=steps // len(evals_top1),
                   **{**(MIXMATCH if algorithm == "mixmatch" else {}), **settings})
    run_dir = out / "runs" / spec.name
    write_spec(run_dir, spec, RunFiles(data_dir="/d", split_file=str(split_file)))
    evals = [{"kind": "eval", "step": spec.eval_every * (i + 1), "top1": a, "top5": 99.0, "loss": 0.5}
             for i, a in enumerate(evals_top1)]
    for e in evals:
        append_metrics(run_dir, {"kind": "train", "step": e["step"], **TRAIN_STATS[algorithm]})
        append_metrics(run_dir, e)
    write_json_atomic(run_dir / "result.json", {
        "algorithm": algorithm, "impl": impl, "recipe": recipe, "n_labels": n, "seed": seed, "steps": steps,
        "optimizer_steps": steps if optimizer_steps is None else optimizer_steps, "resumed_at": [],
        "spec_hash": spec.hash(), **summarize_evals(evals),
        "split_sha256": spec.split_sha256, "data_sha256": data * 64, "data_kind": "image-folder-tar",
        "param_count": 1, "wall_seconds": wall, "steps_per_second": sps, "device": "cpu", "torch_version": "x",
        "code_version": "c", "evals": evals})
    return run_dir


def report(out) -> str:
    return flat(write_report(out).read_text())


def row(text, n, name):
    return next(line for line in flat(text).splitlines() if line.startswith(f"| {n} | {name} |"))


def test_table_mean_std_over_seeds_worked_by_hand(tmp_path):
    # ours, 40 labels: final 50 and 60 -> mean 55, sample std sqrt(((5)^2 + (5)^2) / 1) = 7.07
    fake_run(tmp_path, "own", 40, 0, [52.0, 50.0], split="a")
    fake_run(tmp_path, "own", 40, 1, [61.0, 60.0], split="b")
    fake_run(tmp_path, "torchssl", 40, 0, [41.0, 40.0], split="a", sps=1.0, wall=100.0)
    fake_run(tmp_path, "torchssl", 40, 1, [47.0, 44.0], split="b", sps=1.0, wall=100.0)
    text = report(tmp_path)
    ours = row(text, 40, "ours (paper recipe)")
    assert "| 0, 1 | 55.00 ± 7.07 (n=2) |" in ours and "| 56.50 ± 6.36 (n=2) |" in ours  # best: 52, 61
    assert "| 50 s | 2.00 |" in ours
    theirs = row(text, 40, "TorchSSL")
    assert "| 42.00 ± 2.83 (n=2) |" in theirs and "| 44.00 ± 4.24 (n=2) |" in theirs
    assert "MISMATCH" not in text and "Unpaired" not in text
    assert "chosen on the test set" in text and "over its last 20 (2% of training)" in text
    # ten evaluations: the median covers the last fifth of them, and the report says so
    assert "The median below is the median of the last 2 evaluations (every 10 steps: the last 20% of training)" \
        in text
    for name in ("curves-40.png", "throughput.png", "labels.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000 and f"(figures/{name})" in text
    assert "![40 labels" in text and "*Figure: FixMatch, 40 labels: top-1 of the EMA model" in text


def test_only_common_seeds_are_compared_and_the_rest_is_listed_as_unpaired(tmp_path):
    fake_run(tmp_path, "own", 40, 0, [50.0], split="a")
    fake_run(tmp_path, "own", 40, 1, [90.0], split="b")  # TorchSSL lacks seed 1
    fake_run(tmp_path, "torchssl", 40, 0, [40.0], split="a")
    text = report(tmp_path)
    assert "| 0 | 50.00 (n=1) |" in row(text, 40, "ours (paper recipe)")  # not the mean of 50 and 90
    assert "| 0 | 40.00 (n=1) |" in row(text, 40, "TorchSSL")
    unpaired = text.split("### Unpaired runs")[1].split("###")[0]
    assert "40 labels, seed 1, ours (paper recipe): final top-1 90.00" in unpaired
    assert "seed 0" not in unpaired


def test_paired_differences_and_intervals_worked_by_hand(tmp_path):
    # implementation check, final: diffs 1, 2, 3 -> mean 2, std 1, half-width t(0.975, 2) * 1 / sqrt(3)
    # = 4.3027 / 1.7321 = 2.4842 -> [-0.48, +4.48]: contains 0
    # median: diffs 2, 2.5, 3 -> mean 2.5, std 0.5, half-width 1.2421 -> [+1.26, +3.74]: excludes 0
    # two evaluations [a, final] each: median (a + final) / 2, so a = 2 median - final
    for seed, (ours, theirs) in enumerate([([53.0, 51.0], [50.0, 50.0]), ([63.0, 62.0], [60.0, 60.0]),
                                           ([73.0, 73.0], [70.0, 70.0])]):
        fake_run(tmp_path, "own-tssl", 250, seed, ours, split="abc"[seed])
        fake_run(tmp_path, "torchssl", 250, seed, theirs, split="abc"[seed])
    text = report(tmp_path)
    section = text.split("### Implementation check")[1].split("###")[0]
    final = row(section, 250, "final")
    assert "| 0: +1.00, 1: +2.00, 2: +3.00 | +2.00 | 1.00 | 3 | [-0.48, +4.48] |" in final
    assert "no difference detected at n = 3" in final
    median = row(section, 250, "median")
    assert "| +2.50 | 0.50 | 3 | [+1.26, +3.74] |" in median and "excludes 0: higher by 2.50" in median
    assert "### Recipe effect" not in text  # no paper-recipe runs: no such section


def test_a_spec_written_before_a_field_existed_is_in_the_same_study(tmp_path):
    """A field that does not apply is None (hash() leaves it out): a spec.json written before MixMatch's fields
    existed lacks them, and its run is still compared with runs whose spec.json has them as null."""
    old = fake_run(tmp_path, "own-tssl", 250, 0, [50.0], split="a")
    fake_run(tmp_path, "torchssl", 250, 0, [40.0], split="a")
    spec = json.loads((old / "spec.json").read_text())
    for name in ("mixup_alpha", "temperature", "ramp_up"):
        assert spec["spec"].pop(name) is None
    (old / "spec.json").write_text(json.dumps(spec))
    text = report(tmp_path)
    assert text.count("\n## FixMatch") == 1 and "Unpaired" not in text
    assert "| 0: +10.00 |" in row(text.split("### Implementation check")[1], 250, "final")


def test_figures_of_an_earlier_build_that_the_report_no_longer_shows_are_removed(tmp_path):
    fake_run(tmp_path, "own", 40, 0, [50.0], split="a")
    fake_run(tmp_path, "torchssl", 40, 0, [40.0], split="a")
    figures = tmp_path / "figures"
    figures.mkdir()
    for name in ("fixmatch-s1-curves-40.png", "curves-250.png", "fixmatch-throughput.png", "mine.png"):
        (figures / name).write_bytes(b"x")
    write_report(tmp_path)
    assert sorted(p.name for p in figures.iterdir()) == ["curves-40.png", "labels.png", "mine.png", "throughput.png"]


def test_student_t_quantiles():
    assert t975(1) == pytest.approx(12.7062, abs=1e-4) and t975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t975(30) == pytest.approx(2.0423, abs=1e-4)
    for df, exact in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert t975(df) == pytest.approx(exact, abs=1.5e-4)
    p = paired([5.0])
    assert (p.n, p.mean, p.sd, p.low) == (1, 5.0, None, None) and "no interval" in p.verdict()


def test_mismatched_split_is_loud_and_excluded(tmp_path):
    fake_run(tmp_path, "own", 250, 0, [81.0], split="a")
    fake_run(tmp_path, "torchssl", 250, 0, [71.0], split="z")  # another split: not comparable
    fake_run(tmp_path, "own", 250, 1, [90.0], split="b")
    fake_run(tmp_path, "torchssl", 250, 1, [85.0], split="b")
    text = report(tmp_path)
    assert "MISMATCHED RUNS" in text and "250 labels, seed 0: the runs differ in split_sha256" in text
    assert "| 1 | 90.00 (n=1) |" in row(text, 250, "ours (paper recipe)")  # seed 0 left out


def test_a_result_that_disagrees_with_its_spec_is_flagged_and_left_out(tmp_path):
    fake_run(tmp_path, "own", 40, 0, [50.0], steps=100)
    run = fake_run(tmp_path, "torchssl", 40, 0, [50.0], steps=100)
    res = json.loads((run / "result.json").read_text())
    res["steps"] = 101  # TorchSSL's loop runs one step too many unless stopped
    write_json_atomic(run / "result.json", res)
    text = report(tmp_path)
    assert "RUN(S) WHOSE FILES DO NOT CHECK OUT" in text
    assert f"{run / 'result.json'}: steps 101 is not spec.json's 100" in text
    assert "| 40 | TorchSSL |" not in text  # excluded from the table


def test_applied_optimizer_steps_that_differ_exclude_the_seed(tmp_path):
    fake_run(tmp_path, "own", 40, 0, [50.0], steps=100)
    fake_run(tmp_path, "torchssl", 40, 0, [50.0], steps=100, optimizer_steps=99)  # a scaler skipped an update
    text = report(tmp_path)
    assert "40 labels, seed 0: the runs differ in optimizer_steps" in text


def test_empty_results_folder(tmp_path):
    assert "No finished runs yet" in report(tmp_path)


@pytest.mark.parametrize("who", [("own",), ("own", "torchssl")])
def test_report_only_cli(tmp_path, who):
    for w in who:
        fake_run(tmp_path, w, 4000, 0, [94.0, 93.0])
    r = subprocess.run([sys.executable, "run_all.py", "--report-only", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 4000 | ours (paper recipe) | 0 | 93.00 (n=1) |" in flat(text)
    assert ("### Implementation check" in text) is False  # ours with the paper recipe against TorchSSL: no pair


def test_one_table_per_algorithm_and_one_across_algorithms_worked_by_hand(tmp_path):
    # final top-1 per seed (0, 1); fake_run's median equals its final
    finals = {("fixmatch", "own"): (50, 60), ("fixmatch", "own-tssl"): (41, 45), ("fixmatch", "torchssl"): (40, 44),
              ("mixmatch", "own"): (45, 57), ("mixmatch", "own-tssl"): (40, 46), ("mixmatch", "torchssl"): (41, 43)}
    for (algorithm, who), values in finals.items():
        for seed, final in enumerate(values):
            fake_run(tmp_path, who, 40, seed, [float(final)], split="ab"[seed],
                     algorithm=algorithm)
    fake_run(tmp_path, "own", 40, 2, [70.0], split="c", algorithm="mixmatch")  # no FixMatch seed 2
    text = report(tmp_path)
    assert text.startswith("# FixMatch and MixMatch on CIFAR-10: ours against TorchSSL")
    across, rest = text.split("\n## FixMatch against MixMatch: 100 steps, B=64, fp32")[1].split("\n## FixMatch: 100")
    fixmatch, mixmatch = rest.split("\n## MixMatch: 100 steps, B=64, μ=1")
    mixmatch, settings = mixmatch.split("\n## Settings, machines and patches")
    fixmatch_settings, mixmatch_settings = settings.split("### MixMatch: 100 steps")

    # one table per algorithm, each with its own paired sections
    assert "| 40 | ours (paper recipe) | 0, 1 | 55.00 ± 7.07 (n=2) |" in fixmatch  # sd sqrt(50)
    assert "| 40 | ours (paper recipe) | 0, 1 | 51.00 ± 8.49 (n=2) |" in mixmatch  # sd sqrt(72); seed 2 apart
    assert "| 40 | TorchSSL | 0, 1 | 42.00 ± 1.41 (n=2) |" in mixmatch
    assert "### Implementation check" in fixmatch and "### Implementation check" in mixmatch
    assert "| threshold | 0.95 |" in fixmatch_settings and "mixup_alpha" not in fixmatch_settings
    assert "| mixup_alpha | 0.5 |" in mixmatch_settings and "| threshold |" not in mixmatch_settings

    # across algorithms: seeds 0, 1 (seed 2 has no FixMatch run); MixMatch - FixMatch per arm, t(0.975, 1) = 12.7062
    # ours (paper): -5, -3 -> -4, sd sqrt(2), half-width 12.7062 sqrt(2) / sqrt(2) -> [-16.71, +8.71]
    assert ("| 40 | ours (paper recipe) | 0, 1 | final | 55.00 ± 7.07 (n=2) | 51.00 ± 8.49 (n=2) "
            "| -4.00 [-16.71, +8.71] (n=2) |") in across
    # TorchSSL: +1, -1 -> 0, sd sqrt(2) -> [-12.71, +12.71]
    assert ("| 40 | TorchSSL | 0, 1 | median | 42.00 ± 2.83 (n=2) | 42.00 ± 1.41 (n=2) "
            "| +0.00 [-12.71, +12.71] (n=2) |") in across
    # the implementation gap beside it, per algorithm: FixMatch 1, 1 -> +1 [+1, +1]; MixMatch -1, 3 -> +1, sd
    # sqrt(8), half-width 12.7062 * 2 = 25.41
    assert ("| 40 | *implementation check*: ours (TorchSSL recipe) − TorchSSL | 0, 1 | final "
            "| +1.00 [+1.00, +1.00] (n=2) | +1.00 [-24.41, +26.41] (n=2) | |") in across
    # the recipe effect: FixMatch 9, 15 -> +12, sd sqrt(18), half 38.12; MixMatch 5, 11 -> +8
    assert ("| 40 | *recipe effect*: ours (paper recipe) − ours (TorchSSL recipe) | 0, 1 | median "
            "| +12.00 [-26.12, +50.12] (n=2) "
            "| +8.00 [-30.12, +46.12] (n=2) | |") in across
    assert "40 labels, seed 2, MixMatch, ours (paper recipe): final top-1 70.00" in across  # listed, not compared

    # figures per algorithm and budget, never the same file; MixMatch's show what it has
    for name in ("fixmatch-curves-40.png", "mixmatch-curves-40.png", "fixmatch-throughput.png",
                 "mixmatch-throughput.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000 and f"(figures/{name})" in text
    assert "λu(t), the ramped weight of L_U" in mixmatch and "(figures/mixmatch-labels.png)" in mixmatch
    assert "mask rate" in fixmatch and "mask rate" not in mixmatch


def test_algorithms_on_different_protocols_are_not_set_side_by_side(tmp_path):
    fake_run(tmp_path, "own", 40, 0, [50.0])
    fake_run(tmp_path, "own", 40, 0, [45.0], steps=200, algorithm="mixmatch")  # another step budget
    text = report(tmp_path)
    assert " against MixMatch" not in text
    assert "## FixMatch: 100 steps" in text and "## MixMatch: 200 steps" in text
    # one protocol, but two FixMatch studies (another threshold): which one stands for FixMatch is not chosen
    fake_run(tmp_path, "own", 40, 0, [47.0], steps=200, algorithm="mixmatch", temperature=0.25)
    fake_run(tmp_path, "own", 40, 0, [52.0], steps=200)
    fake_run(tmp_path, "own", 40, 0, [53.0], steps=200, threshold=0.9)
    text = report(tmp_path)
    assert "## FixMatch against MixMatch: 200 steps" in text
    assert "Not set side by side: FixMatch and MixMatch each have several studies here" in text


def fake_identity(out, algorithm="fixmatch", *, exact_ok=True, error=None):
    """An OUT/identity/<algorithm>.json as python -m identity writes it: one stress case of 3 steps, one bug."""
    (out / "identity").mkdir(exist_ok=True)
    if error:
        write_json_atomic(out / "identity" / f"{algorithm}.json", {"algorithm": algorithm, "error": error})
        return
    zero = {q: [0.0] * 3 for q in ("logits", "loss", "params", "ema")}
    first = None if exact_ok else {"step": 2, "quantity": "logits", "where": "forward 0", "rel": 1e-3, "n_diff": 5}
    shipped_first = {"step": 1, "quantity": "ema", "where": "fc.weight", "rel": 4e-8, "n_diff": 9}
    case = {"setting": "stress", "network": "WRN-28-2", "steps": 3, "seconds": 1.0, "spec": {"threshold": 0.35},
            "exercised": {"mask_rate": [0.0, 0.5, 1.0], "loss_u": [0, 1, 1], "steps_with_some_accepted": 2,
                          "steps_with_some_rejected": 2},
            "exact": {"identical": exact_ok, "first_difference": first, "eval_logits_identical": exact_ok},
            "shipped": {"first_difference": shipped_first, "from": ["multi-tensor EMA (lerp)"], "above_noise": None,
                        "max_rel": {"ema": 1e-7, "params": 0.0}},
            "power": [{"bug": "no Nesterov momentum", "caught": True, "above_noise": True,
                       "first_difference": {"step": 1, "quantity": "update", "rel": 0.47, "where": "conv.weight"}}],
            "per_step": {"exact": zero, "as shipped": {**zero, "ema": [4e-8, 6e-8, 1e-7]},
                         "noise": {q: [1e-7, 1e-5, 1e-3] for q in zero}}}
    exact = ("identical in exact mode for 3 steps" if exact_ok else "DIFFERENT in exact mode: first at step 2 in logits")
    write_json_atomic(out / "identity" / f"{algorithm}.json", {
        "algorithm": algorithm, "cases": [case], "command": "python -m identity ...", "torch_version": "x",
        "verdict": {"passed": exact_ok, "exact": exact, "shipped": "as shipped, first difference at step 1 in ema",
                    "power": "1 of 1 planted bugs caught"}})


def test_report_opens_with_the_identity_verdict(tmp_path):
    """Before any accuracy table: each algorithm's verdict, its cases and bugs, its figure; a failing check is
    the first line, and a check that could not run says why."""
    fake_run(tmp_path, "own-tssl", 40, 0, [40.0, 42.0])
    fake_run(tmp_path, "torchssl", 40, 0, [41.0, 43.0])
    fake_identity(tmp_path, "fixmatch", exact_ok=False)
    fake_identity(tmp_path, "mixmatch", error="TorchSSL checkout /x does not exist")
    text = report(tmp_path)
    body = text.split("## Same computation? The identity check\n\n", 1)[1]
    assert body.startswith("- ❌ **FixMatch, ours against TorchSSL**: DIFFERENT in exact mode: first at step 2 in logits")
    assert "**MixMatch, ours against TorchSSL: the identity check could not run** (TorchSSL checkout /x does not" \
        in body
    assert text.index("identity check") < text.index("| labels | run |")  # before every accuracy table
    assert "| no Nesterov momentum | WRN-28-2 | yes | 1 | update | 4.7e-01 | yes |" in text
    assert "(figures/identity-fixmatch.png)" in text and (tmp_path / "figures" / "identity-fixmatch.png").exists()
    assert "✅ 2 finished runs: 1 pixel checksum(s)" in text  # the data side, from the runs' checksums
    fake_identity(tmp_path, "fixmatch", exact_ok=True)
    assert "✅ **FixMatch, ours against TorchSSL**: identical in exact mode for 3 steps" in report(tmp_path)


@pytest.mark.parametrize("arms, title", [
    (("own", "torchssl"), "ours against TorchSSL"),
    (("own-usb", "usb"), "ours against USB"),
    (("own", "torchssl", "usb"), "ours against TorchSSL and USB"),
    (("own", "own-tssl"), "ours, recipe against recipe"),  # no reference ran: none is named
    ((), "ours against TorchSSL"),                           # nothing ran yet: what a run would compare
])
def test_the_title_names_the_references_that_ran(tmp_path, arms, title):
    for who in arms:
        fake_run(tmp_path, who, 40, 0, [10.0, 20.0])
    algorithms = "FixMatch" if arms else "FixMatch and MixMatch"  # with no run, every algorithm the project has
    assert report(tmp_path).splitlines()[0] == f"# {algorithms} on CIFAR-10: {title}"
