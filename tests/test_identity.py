"""The identity check (identity/): the comparison by hand, and the real check of both algorithms against TorchSSL's
unedited train() on the real data: exact mode bit-identical, as shipped within float noise, every planted bug
caught (with its step and quantity), across WideResNet depths and widths."""
import math

import pytest
import torch

from identity.compare import difference, nudged

from conftest import run_identity


def test_difference_by_hand():
    a = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    assert difference(a, {k: v.clone() for k, v in a.items()}).equal
    b = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    d = difference(a, b)
    # ||a - b|| = 1; ||a|| = 5, ||b|| = sqrt(26): relative 1 / sqrt(26)
    assert (d.n_diff, d.n, d.where) == (1, 3, "b") and math.isclose(d.rel, 1 / math.sqrt(26))
    nan = {"x": torch.tensor([float("nan"), 1.0])}
    assert difference(nan, {"x": torch.tensor([float("nan"), 1.0])}).equal  # NaN where both have one is equal
    with pytest.raises(KeyError):
        difference(a, {"w": a["w"]})


def test_nudged_moves_every_nonzero_element_one_ulp():
    t = torch.tensor([1.0, -2.0, 0.0, 3e-30])
    n = nudged(t)
    assert n[2] == 0 and torch.all(n[[0, 1, 3]].abs() > t[[0, 1, 3]].abs())
    assert torch.equal(torch.nextafter(n, torch.zeros(4))[[0, 1, 3]], t[[0, 1, 3]])  # one step back is the original
    down = nudged(t, toward_zero=True)
    assert down[2] == 0 and torch.all(down[[0, 1, 3]].abs() < t[[0, 1, 3]].abs())
    assert torch.equal(torch.nextafter(down, t * 2)[[0, 1, 3]], t[[0, 1, 3]])


def test_float_noise_is_the_larger_of_its_measurements_at_each_step():
    """envelope: per step and quantity the larger difference of the two noise runs, then float_noise's running
    maximum (and one ulp per step for carried state)."""
    from identity.check import ULP, Trace, envelope, float_noise
    from identity.compare import Difference
    from identity.own_side import NOISE, NOISE_DOWN

    def trace(variant, losses, params):
        return Trace(variant, [{"loss": Difference(a, "", 1, 1), "params": Difference(b, "", 1, 1)}
                               for a, b in zip(losses, params)], Difference(losses[-1], "", 1, 1))

    up = trace(NOISE, [1e-7, 1e-3, 1e-5], [0.0, 2e-7, 1e-3])
    down = trace(NOISE_DOWN, [2e-7, 1e-4, 5e-3], [0.0, 1e-7, 1e-4])
    both = envelope([up, down])
    assert [s["loss"].rel for s in both.steps] == [2e-7, 1e-3, 5e-3] and both.eval_logits.rel == 5e-3
    bound = float_noise(both)
    assert bound["loss"] == [2e-7, 1e-3, 5e-3]  # running maximum of the larger
    assert bound["params"] == [ULP, 2 * ULP, 1e-3]  # at least one ulp per step for state carried across steps


@pytest.fixture
def check_spec_dir(make_run_dir, torchssl_checkout):
    """A run-spec file naming the real data, a split and the TorchSSL checkout, for an algorithm's check."""
    from harness.plan import ALGORITHM_DEFAULTS

    def make(algorithm: str):
        return make_run_dir("own", recipe="torchssl", algorithm=algorithm, files={"torchssl_checkout":
                            str(torchssl_checkout)}, **ALGORITHM_DEFAULTS[algorithm])

    return make


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_check_passes_and_catches_every_planted_bug(check_spec_dir, tmp_path, algorithm):
    """WRN-10-1, 12 steps, both settings, both modes: exact mode bit-identical (logits at the end included), as
    shipped within float noise and its first difference traced to a shipped part, every planted bug caught."""
    proc, result = run_identity(tmp_path, check_spec_dir(algorithm), "--steps", "12", "--networks", "10x1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (result["reference"], result["subject"]) == ("torchssl", "own")  # the default pair
    v = result["verdict"]
    assert v["exact_identical"] and v["shipped_within_noise"] and v["passed"]
    assert [c["setting"] for c in result["cases"]] == ["stress", "spec"]
    for c in result["cases"]:
        assert c["exact"]["identical"] and c["exact"]["eval_logits_identical"]
        assert all(x == 0 for series in c["per_step"]["exact"].values() for x in series)
        first = c["shipped"]["first_difference"]
        assert first is None or c["shipped"]["from"], first  # every as-shipped difference has a known cause
    stress = result["cases"][0]
    if algorithm == "fixmatch":  # the consistency loss was live: some pseudo-labels accepted, some rejected
        assert stress["exercised"]["steps_with_some_accepted"] >= 6
        assert stress["exercised"]["steps_with_some_rejected"] >= 6
    else:
        assert stress["exercised"]["lambda_u"][0] == 0 < stress["exercised"]["lambda_u"][-1]
    bugs = stress["power"]
    expected = 7 if algorithm == "fixmatch" else 9  # 4 shared, its own (2; 4), the width-1 wiring
    assert len(bugs) == expected and v["bugs_caught"] == v["bugs_planted"] == expected
    for bug in bugs:
        f = bug["first_difference"]
        print(f"{algorithm}: {bug['bug']}: caught at step {f['step']} in {f['quantity']} (relative {f['rel']:.1e})")
        assert bug["caught"] and f["step"] <= 3 and f["rel"] > 0


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_exact_mode_is_identical_at_every_depth_and_width(check_spec_dir, tmp_path, algorithm):
    """WRN-10-2 and WRN-28-2 (WRN-10-1 above): TorchSSL's network and ours with its wiring, bit for bit."""
    proc, result = run_identity(tmp_path, check_spec_dir(algorithm), "--steps", "4", "--networks", "10x2", "28x2",
                                "--modes", "exact", "--no-power", "--settings", "stress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [c["network"] for c in result["cases"]] == ["WRN-10-2", "WRN-28-2"]
    assert all(c["exact"]["identical"] and c["exact"]["eval_logits_identical"] for c in result["cases"])


def test_a_check_that_cannot_run_says_why(make_run_dir, tmp_path):
    run = make_run_dir("own", recipe="torchssl", files={"torchssl_checkout": str(tmp_path / "nowhere")})
    proc, result = run_identity(tmp_path, run)
    assert proc.returncode == 2 and result == {}
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr
