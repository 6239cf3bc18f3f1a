"""The identity check against USB (identity/usb_side.py: USB's unedited AlgorithmBase.train(), its hooks, optimizer,
scheduler and EMA), on the real data: ours with the `usb` recipe bit-identical in exact mode, as shipped within float
noise, every planted bug caught; and USB against TorchSSL (identity/cross.py): USB's loop driving TorchSSL's
network is TorchSSL's FixMatch bit for bit, while USB's own network differs at step 1, in the logits."""

import pytest

from conftest import run_identity

STEPS = "12"


@pytest.fixture
def check_spec_dir(make_run_dir, usb_checkout, request):
    """A run-spec file naming the real data, a split and USB's checkout (with_torchssl: TorchSSL's too, else the
    test needs no TorchSSL checkout), for an algorithm's check."""
    from harness.plan import ALGORITHM_DEFAULTS

    def make(algorithm: str, with_torchssl: bool = False):
        files = {"usb_checkout": str(usb_checkout)}
        if with_torchssl:
            files["torchssl_checkout"] = str(request.getfixturevalue("torchssl_checkout"))
        return make_run_dir("own", recipe="usb", algorithm=algorithm, files=files, **ALGORITHM_DEFAULTS[algorithm])

    return make


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_ours_against_usb_passes_and_catches_every_planted_bug(check_spec_dir, tmp_path, algorithm):
    """WRN-10-1, 12 steps, both settings, both modes: exact mode bit-identical to USB's train() (logits at the end
    included), as shipped within float noise with its first difference traced to a shipped part, every planted bug
    caught (those of TorchSSL's check that apply, and USB's recipe entries set to TorchSSL's values)."""
    proc, result = run_identity(tmp_path, check_spec_dir(algorithm), "--reference", "usb", "--steps", STEPS,
                                "--networks", "10x1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (result["reference"], result["subject"], result["algorithm"]) == ("usb", "own", algorithm)
    assert "usb_commit" in result and "torchssl_commit" not in result
    v = result["verdict"]
    assert v["exact_identical"] and v["shipped_within_noise"] and v["passed"]
    assert v["exact"].startswith("identical to USB's AlgorithmBase.train() in exact mode for 12 steps")
    for c in result["cases"]:
        assert c["spec"]["recipe"] == "usb"
        assert c["exact"]["identical"] and c["exact"]["eval_logits_identical"]
        assert all(x == 0 for series in c["per_step"]["exact"].values() for x in series)
        first = c["shipped"]["first_difference"]
        assert first is None or c["shipped"]["from"], first
    stress = result["cases"][0]
    if algorithm == "fixmatch":
        assert stress["exercised"]["steps_with_some_accepted"] >= 6
        assert stress["exercised"]["steps_with_some_rejected"] >= 6
    else:
        assert stress["exercised"]["lambda_u"][0] == 0 < stress["exercised"]["lambda_u"][-1]
    bugs = {b["bug"]: b for b in stress["power"]}
    # shared 4 + FixMatch's 2 (MixMatch's 3 without TorchSSL's no-interleaving one) + width-1 wiring + USB's eps,
    # and MixMatch's 3 USB recipe entries
    assert len(bugs) == (8 if algorithm == "fixmatch" else 12) == v["bugs_caught"] == v["bugs_planted"]
    assert "mixed batch through BatchNorm without interleaving" not in bugs
    for name, bug in bugs.items():
        f = bug["first_difference"]
        print(f"{algorithm} vs USB: {name}: caught at step {f['step']} in {f['quantity']} (relative {f['rel']:.1e})")
        assert bug["caught"] and f["step"] <= 3 and f["rel"] > 0
    assert bugs["BatchNorm eps 1e-3 in the residual blocks (USB: 1e-5)"]["first_difference"]["step"] == 1
    if algorithm == "mixmatch":
        assert bugs["mixed batch interleaved (USB's MixMatch does not interleave)"]["first_difference"]["quantity"] \
            == "logits"


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_exact_mode_against_usb_is_identical_where_group_1_widens(check_spec_dir, tmp_path, algorithm):
    """WRN-10-2 (group 1's first block widens: its shortcut conv, activated input) and WRN-28-2 (USB's own wrn_28_2
    builder, not the adapter's size patch): USB's network and ours with its recipe, bit for bit, 4 steps."""
    proc, result = run_identity(tmp_path, check_spec_dir(algorithm), "--reference", "usb", "--steps", "4",
                                "--networks", "10x2", "28x2", "--modes", "exact", "--no-power", "--settings", "stress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [c["network"] for c in result["cases"]] == ["WRN-10-2", "WRN-28-2"]
    assert all(c["exact"]["identical"] and c["exact"]["eval_logits_identical"] for c in result["cases"])


@pytest.mark.parametrize("algorithm", ["fixmatch", "mixmatch"])
def test_usb_against_torchssl_reports_its_network(check_spec_dir, tmp_path, algorithm):
    """USB's train() and TorchSSL's in lockstep (stress setting, WRN-10-1, 12 steps). With TorchSSL's network class,
    USB's FixMatch is TorchSSL's bit for bit; its MixMatch step differs from step 1 (its recipe). With its own
    network, started from TorchSSL's weights less the 8 block conv biases it lacks, the first difference is at
    step 1 in the logits of the first forward, every element, and the check says so."""
    proc, result = run_identity(tmp_path, check_spec_dir(algorithm, with_torchssl=True), "--subject", "usb",
                                "--reference", "torchssl",
                                "--steps", STEPS, "--networks", "10x1", "--settings", "stress")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (result["subject"], result["reference"]) == ("usb", "torchssl")
    assert {"usb_commit", "torchssl_commit"} <= set(result)
    v = result["verdict"]
    assert v["passed"] and v["exact_identical"] == (algorithm == "fixmatch")
    (case,) = result["cases"]
    same, own = case["torchssl_network"], case["usb_network"]
    assert same["as_expected"] and own["as_expected"]
    if algorithm == "fixmatch":
        assert same["identical"] and same["eval_logits"]["n_diff"] == 0
        assert all(x == 0 for series in same["per_step"].values() for x in series)
        assert "identical to TorchSSL's train() for 12 steps" in v["exact"]
        assert case["exercised"]["steps_with_some_accepted"] >= 6
    else:
        f = same["first_difference"]
        assert f["step"] == 1 and f["quantity"] == "t_mix" and f["rel"] < 1e-6  # the guess's renormalisation
        assert max(same["per_step"]["logits"]) > 1e-3  # the mixed batch not interleaved
        assert same["usb_forwards_left_out"] == own["usb_forwards_left_out"] == 12  # its extra labelled forward
    assert len(own["only_in_torchssl"]) == 8 and all(n.endswith(".bias") for n in own["only_in_torchssl"])
    first = own["first_difference"]
    assert first["step"] == 1 and first["quantity"] in ("logits", "t_mix")  # MixMatch: its guess sees the logits
    logits = own["at_first_difference"]["logits"][0]
    print(f"{algorithm}: USB's network against TorchSSL's at step 1: logits of forward 0 relative {logits['rel']:.1e} "
          f"({logits['n_diff']} of {logits['n']}); most different parameters after step 1: "
          f"{[(p['tensor'], round(p['rel'], 4)) for p in own['at_first_difference']['parameters'][:3]]}")
    assert logits["rel"] > 1e-4 and logits["n_diff"] == logits["n"]
    assert own["eval_logits"]["rel"] > 1e-4 and own["max_rel"]["params"] > 1e-4
    assert "conv-bias tensors of TorchSSL's left out" in v["shipped"] and "step 1" in v["shipped"]


def test_a_usb_check_that_cannot_run_says_why(make_run_dir, tmp_path):
    run = make_run_dir("own", recipe="usb")  # no usb_checkout named
    proc, result = run_identity(tmp_path, run, "--reference", "usb")
    assert proc.returncode == 2 and result == {}
    assert "names no usb_checkout" in proc.stderr
    proc, _ = run_identity(tmp_path, run, "--subject", "usb", "--reference", "usb")
    assert proc.returncode == 2 and "against itself" in proc.stderr
