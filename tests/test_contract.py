"""The shared contract: the paper's median-of-last-20, final and best, worked out by hand."""
import pytest

from contract.results import summarize_evals


def test_summary_statistics_by_hand():
    # 25 evaluations at steps 100..2500 with top-1 = 1..24 and a final drop to 10, handed over out of order.
    top1 = list(range(1, 25)) + [10]
    evals = [{"step": 100 * (i + 1), "top1": float(a), "top5": 50.0 + i, "loss": 1.0 / (i + 1)}
             for i, a in enumerate(top1)]
    s = summarize_evals(evals[::-1])
    assert s["final_top1"] == 10.0  # the last step's, not the best
    assert s["best_top1"] == 24.0
    # 25 evaluations: the window is the last fifth, 5 of them (21, 22, 23, 24, 10), whose median is 22.
    assert (s["median20_top1"], s["median_window"]) == (22.0, 5)
    # The paper's window of 20 asked for: evaluations 6..25, values 6..24 and 10; the 10th and 11th are 14 and 15.
    assert summarize_evals(evals, window=20)["median20_top1"] == 14.5
    assert s["final_top5"] == 74.0 and s["final_loss"] == pytest.approx(1 / 25)


def test_short_runs_take_the_median_over_their_last_fifth_only():
    s = summarize_evals([{"step": 1, "top1": 30.0, "top5": 0, "loss": 0}, {"step": 2, "top1": 50.0, "top5": 0,
                                                                             "loss": 0}])
    # Two evaluations: a fifth rounds up to one, the last; never the whole training curve.
    assert (s["final_top1"], s["best_top1"], s["median20_top1"], s["median_window"]) == (50.0, 50.0, 50.0, 1)


@pytest.mark.parametrize("n, window", [(1, 1), (10, 2), (11, 3), (100, 20), (1024, 20)])
def test_median_window_is_the_papers_20_but_never_more_than_the_last_fifth(n, window):
    evals = [{"step": i, "top1": float(i), "top5": 0, "loss": 0} for i in range(n)]
    assert summarize_evals(evals)["median_window"] == window


def test_no_evaluation_is_an_error():
    with pytest.raises(ValueError, match="no evaluation"):
        summarize_evals([])
