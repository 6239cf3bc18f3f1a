"""TensorBoard events beside metrics.jsonl: both implementations write the same tags for the same quantities, read
back with tensorboard's own event reader, and agree with metrics.jsonl."""
import pytest

from contract.recorder import TENSORBOARD_DIR
from contract.results import read_metrics

from conftest import run_module


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_both_implementations_write_the_same_tags(make_run_dir, torchssl_checkout):
    runs = {"own": make_run_dir("own", recipe="torchssl", steps=4, eval_every=2, log_every=2),
            "torchssl": make_run_dir("torchssl", steps=4, eval_every=2, log_every=2,
                                     files={"torchssl_checkout": str(torchssl_checkout)})}
    entry = {"own": "own_impl.train", "torchssl": "third_party.torchssl.entry"}
    tags = {}
    for impl, run in runs.items():
        proc = run_module(entry[impl], run)
        assert proc.returncode == 0, proc.stderr[-2000:]
        events = scalars(run)
        tags[impl] = set(events)
        for rec in read_metrics(run):  # every number of every record, at its step, as in metrics.jsonl
            for name, value in rec.items():
                if rec["kind"] in ("train", "eval") and isinstance(value, float) and name != "step":
                    assert (rec["step"], pytest.approx(value, rel=1e-6)) in events[f"{rec['kind']}/{name}"], name
    shared = {"train/loss", "train/loss_x", "train/loss_u", "train/mask_rate", "train/lr", "eval/top1", "eval/top5",
              "eval/loss"}
    assert shared <= tags["own"] and shared <= tags["torchssl"]
    assert scalars(runs["own"])["eval/top1"][-1][0] == 4
