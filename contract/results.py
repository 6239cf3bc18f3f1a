"""The result schema both implementations write, and the metrics/result files of a run folder."""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
LAUNCH_FILE = "launch.json"  # how the run was started, written by whoever started it (e.g. {"launcher": "slurm", ...})

# Every result.json carries exactly these keys (more are allowed), with the same meaning for every implementation.
RESULT_KEYS = (
    "algorithm", "impl", "recipe", "n_labels", "seed", "steps", "optimizer_steps", "resumed_at", "spec_hash",
    "final_top1", "best_top1", "median20_top1", "median_window", "final_top5", "final_loss",
    "split_sha256", "data_sha256", "data_kind", "param_count",
    "wall_seconds", "steps_per_second", "device", "torch_version", "code_version", "evals",
    "tf32_conv", "tf32_matmul",  # TF32 allowed for float32 convolutions, matmuls on CUDA (contract/precision.py)
)
MEDIAN_WINDOW = 20  # the paper's statistic: the median of the last 20 evaluations ...
MEDIAN_SHARE = 0.2  # ... and of at most the last fifth of them, so that a short run's median is of its end
TAIL_BYTES = 64 * 1024  # the end of a metrics.jsonl read for a run's progress: a few hundred lines


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a temporary file of this process's own beside `path`, then put it in place durably and
    atomically: a reader sees the old file or the whole new one, and processes writing the same path at once never
    share a temporary name. A failure (a full disk, a read-only folder) leaves no temporary file and is an OSError
    that names `path`."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        replace_durably(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomic(path, write)


def write_json_once(path: Path, obj: Any) -> bool:
    """Write `path` only if it does not exist yet, whole or not at all: first writer wins (a hard link of a finished
    file of this process's own, which fails if another process's file is there). False if one was there."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def replace_durably(tmp: Path, path: Path) -> None:
    """Put the finished file `tmp` in place of `path`: on disk first (fsync), then an atomic rename, so a reader
    sees the old file or the new one, never half of one."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; a missing or malformed file is one clear error naming `what` it should be."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per record; `kind` is "train" (training statistics) or "eval" (one evaluation)."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: everything before it stands
                continue
    return out


class MetricsTail:
    """The records appended to a run's metrics.jsonl since the last call; a line still being written waits for its
    newline, a line cut short by a kill is skipped, and a rewritten file (a resume truncates it through a new file)
    is read again from its start. Costs what was appended, not the file's size, so it can be polled."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.file_id, self.offset = None, 0

    def read(self) -> list[dict[str, Any]]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self.file_id, self.offset = None, 0
            return []
        with f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:
                self.file_id, self.offset = (st.st_dev, st.st_ino), 0
            if self.offset == 0 and st.st_size > TAIL_BYTES:  # a long run's first read: only its end matters
                self.offset = st.st_size - TAIL_BYTES
                f.seek(self.offset)
                f.readline()  # a line cut by the seek
                self.offset = f.tell()
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1  # complete lines only
        self.offset += end
        records = []
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


@dataclass
class Progress:
    """How far a run is, from the end of its metrics.jsonl."""

    step: int = 0  # last step logged
    train_seconds: float | None = None  # training time up to the last training record
    top1: float | None = None  # last evaluation's top-1, %

    def add(self, records: list[dict[str, Any]]) -> "Progress":
        for rec in records:
            self.step = max(self.step, rec.get("step", 0))
            if rec.get("kind") == "train":
                self.train_seconds = rec.get("train_seconds", self.train_seconds)
            elif rec.get("kind") == "eval":
                self.top1 = rec.get("top1")
        return self


def latest_progress(run_dir: Path) -> Progress:
    """A run's progress from the end of its metrics.jsonl (its last TAIL_BYTES at most)."""
    return Progress().add(MetricsTail(run_dir).read())


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """On resume, drop records past the checkpoint's step so no step is logged twice."""
    path = Path(run_dir) / METRICS_FILE
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def median_window(n_evals: int) -> int:
    """How many of a run's last evaluations its median covers: the paper's 20 (2% of its 1,024), never more than
    the last MEDIAN_SHARE of them, at least one."""
    return max(1, min(MEDIAN_WINDOW, math.ceil(MEDIAN_SHARE * n_evals)))


def summarize_evals(evals: list[dict[str, Any]], window: int | None = None) -> dict[str, float]:
    """final, best (chosen on the test set) and the median of the last `window` evaluations (median_window's by
    default), all top-1 in %; median_window says how many it covers."""
    if not evals:
        raise ValueError("no evaluation was recorded")
    evals = sorted(evals, key=lambda r: r["step"])
    top1 = [r["top1"] for r in evals]
    window = top1[-(window or median_window(len(top1))):]
    return {
        "final_top1": top1[-1],
        "best_top1": max(top1),
        "median20_top1": statistics.median(window),
        "median_window": len(window),
        "final_top5": evals[-1]["top5"],
        "final_loss": evals[-1]["loss"],
    }


def validate_result(result: dict[str, Any]) -> None:
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise ValueError(f"result is missing keys {missing}")


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
    if not path.exists():
        return None
    return read_json(path, "result file")


def finished_result(run_dir: Path, spec) -> dict[str, Any] | None:
    """The run folder's result if the run is done (and says so on stdout), else None; a result of another spec
    is an error. `spec`: the run's contract.spec.RunSpec."""
    done = read_result(run_dir)
    if done is None:
        return None
    if done.get("spec_hash") != spec.hash():
        raise ValueError(f"{Path(run_dir) / RESULT_FILE} belongs to spec {done.get('spec_hash')}, not {spec.hash()}")
    print(f"run {spec.name} is done ({Path(run_dir) / RESULT_FILE}); nothing to do")
    return done


def read_launch(run_dir: Path) -> dict[str, Any]:
    """RUN/launch.json: how the run was started ({"launcher": "local"} when absent); result.json carries its keys.
    The launcher writes it, so an implementation records how it was started without knowing it."""
    path = Path(run_dir) / LAUNCH_FILE
    return read_json(path, "launch file") if path.exists() else {"launcher": "local"}


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]


def write_result(run_dir: Path, spec, files, log, *, steps: int, data_sha256: str, param_count: int,
                 wall_seconds: float, train_seconds: float, device: str, eval_images: int,
                 **impl_keys: Any) -> dict[str, Any]:
    """Build result.json from the spec, what spec.json says of the code and machine (`files`: its RunFiles), the
    run folder's evaluations and what the implementation measured (the RESULT_KEYS every implementation shares,
    plus its own `impl_keys`); validate it, write it atomically, log the closing line. Returns the result."""
    import torch

    from contract.precision import precision_record

    metrics = read_metrics(run_dir)
    evals = [r for r in metrics if r.get("kind") == "eval"]
    train = [r for r in metrics if r.get("kind") == "train"]
    counted = [r.get("optimizer_steps") for r in train]
    result = {
        **read_launch(run_dir),  # first, so that no key of it can replace one of the result's own
        "algorithm": spec.algorithm, "impl": spec.impl, "recipe": spec.recipe, "n_labels": spec.n_labels,
        "seed": spec.seed, "steps": steps,
        # updates the optimizer really applied, counted by a hook (a gradient scaler may skip some); None if not
        # counted. The training records partition the steps (each checkpoint closes one), so their sum is exact.
        "optimizer_steps": sum(counted) if counted and None not in counted else None,
        "resumed_at": [r["step"] for r in metrics if r.get("kind") == "resume"],  # empty: never stopped
        "spec_hash": spec.hash(), "eval_every": spec.eval_every,
        **summarize_evals(evals),
        "split_sha256": spec.split_sha256, "data_sha256": data_sha256, "data_kind": spec.data_kind,
        "data_source": files.data_source,
        "param_count": param_count,
        "wall_seconds": wall_seconds,  # summed over processes, evaluation included
        "train_seconds": train_seconds,  # training steps only
        "steps_per_second": steps / train_seconds if train_seconds > 0 else None,
        "device": device, "device_name": files.machine,
        "torch_version": torch.__version__, "code_version": files.code_version,
        "precision": spec.precision, "channels_last": spec.channels_last, "eval_images": eval_images,
        "evals": evals, **precision_record(), **impl_keys,
    }
    validate_result(result)
    write_json_atomic(Path(run_dir) / RESULT_FILE, result)
    log(f"done: final top1 {result['final_top1']:.2f}, median of last {result['median_window']} "
        f"{result['median20_top1']:.2f}; {result['optimizer_steps']} optimizer steps applied; "
        f"{result['steps_per_second'] or 0:.3f} steps/s")
    return result
