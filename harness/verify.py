"""Whether a run folder's files can be read and agree: result.json against spec.json, the split file and the
evaluations in metrics.jsonl; what the runner does with a damaged one, and what the report says of each."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from contract.arrays import indices_sha256
from contract.results import METRICS_FILE, RESULT_FILE, read_evals, read_json, read_metrics, summarize_evals
from contract.spec import SPEC_FILE, RunSpec, read_spec

# result.json fields that must equal the spec's (result key, spec field).
FROM_SPEC = (("impl", "impl"), ("n_labels", "n_labels"), ("seed", "seed"), ("steps", "steps"),
             ("split_sha256", "split_sha256"), ("data_sha256", "data_sha256"), ("data_kind", "data_kind"))
# result.json statistics recomputed from metrics.jsonl's evaluations.
FROM_EVALS = ("final_top1", "median20_top1", "best_top1", "final_top5", "final_loss")
REDO = "move it away and run run_all.py again with the same flags: the run is finished again from its checkpoint"
AFRESH = ("its evaluations cannot be recovered from a checkpoint: move the whole run folder away and run run_all.py "
          "again with the same flags (the run starts afresh)")
CHECKOUTS = (("torchssl_checkout_clean", "TorchSSL"), ("usb_checkout_clean", "USB"))


def set_aside(path: Path) -> Path:
    """Rename a damaged file to NAME.damaged (NAME.damaged-2, ... if taken): kept for a look, no longer read."""
    path = Path(path)
    kept, n = path.with_name(path.name + ".damaged"), 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{path.name}.damaged-{n}")
    path.replace(kept)
    return kept


def finished(run_dir: Path, spec_hash: str) -> bool:
    """Whether the run in run_dir is done: a readable result.json of this spec and a readable spec.json. Reads only;
    set_aside_damaged is the step that moves damaged files away."""
    run_dir = Path(run_dir)
    result, _ = _read_object(run_dir / RESULT_FILE, "result file")
    if result is None or result.get("spec_hash") != spec_hash:
        return False
    spec, _ = _read_object(run_dir / SPEC_FILE, "run spec")
    return spec is not None


def set_aside_damaged(run_dir: Path) -> list[str]:
    """Before a run is (re)started: a result.json or spec.json that cannot be read is renamed NAME.damaged (kept for
    a look); the runner writes spec.json again and the entry finishes the run again from its last checkpoint.
    Returns one line per file set aside."""
    lines = []
    for name, what, then in ((RESULT_FILE, "result file", "the run is finished again from its checkpoint"),
                             (SPEC_FILE, "run spec", "it is written again")):
        _, problem = _read_object(Path(run_dir) / name, what)
        if problem:
            kept = set_aside(Path(run_dir) / name)
            lines.append(f"warning: {problem}; kept as {kept.name}, and {then}")
    return lines


def _read_object(path: Path, what: str) -> tuple[dict | None, str | None]:
    """(content, None) for a readable JSON object; (None, why) for a damaged one; (None, None) for none."""
    if not path.exists():
        return None, None
    try:
        content = read_json(path, what)
        if not isinstance(content, dict):
            raise ValueError(f"{what} {path} holds no JSON object")
        if what == "run spec":
            read_spec(path)
        return content, None
    except ValueError as e:  # read_json's and read_spec's messages name the file
        return None, str(e)


def load_run(run_dir: Path) -> dict | None:
    """For the report: {"dir", "spec" (dict), "result", "metrics", "problems"} of a run folder holding a
    result.json, else None. `problems` lists, in one line each naming the file and what to do, every file that
    cannot be read and every way the result disagrees with the rest (check_run); spec and result are None when
    they cannot be read. A run with problems must be shown, never compared."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULT_FILE).exists():
        return None
    run = {"dir": run_dir, "spec": None, "result": None, "metrics": [], "problems": []}
    try:
        run["result"] = read_json(run_dir / RESULT_FILE, "result file")
        if not isinstance(run["result"], dict):
            raise ValueError(f"result file {run_dir / RESULT_FILE} holds no JSON object")
    except ValueError as e:
        run["problems"].append(f"{e}; {REDO}")
        return run
    try:
        spec, files = read_spec(run_dir / SPEC_FILE)
    except (ValueError, FileNotFoundError) as e:
        run["problems"].append(f"{e}; run run_all.py again with the same flags to write it again")
        return run
    run["spec"] = read_json(run_dir / SPEC_FILE, "run spec")["spec"]  # as written (sorted keys), as before
    run["metrics"] = read_metrics(run_dir)
    run["problems"] = check_run(run_dir, run["result"], spec, files.split_file)
    return run


def check_run(run_dir: Path, result: dict[str, Any], spec: RunSpec, split_file: str) -> list[str]:
    """The ways result.json disagrees with spec.json, the split file and metrics.jsonl, one line each naming the
    file and what to do (empty: it checks out). `split_file`: where spec.json says the split is; a results folder
    copied elsewhere is searched for it under OUT/splits/."""
    run_dir = Path(run_dir)
    found = []
    if result.get("spec_hash") != spec.hash():
        found.append(f"spec_hash {result.get('spec_hash')} is not spec.json's {spec.hash()}")
    for key, field in FROM_SPEC:
        if result.get(key) != getattr(spec, field):
            found.append(f"{key} {str(result.get(key))[:16]} is not spec.json's {str(getattr(spec, field))[:16]}")
    evals, lost = _eval_problems(run_dir, result, spec)
    problems = [f"{run_dir / RESULT_FILE}: {p}; its numbers are not used ({REDO})" for p in found + evals]
    problems += [f"{run_dir / RESULT_FILE}: {p}; its numbers are not used ({AFRESH})" for p in lost]
    for key, name in CHECKOUTS:
        if result.get(key) is False:
            problems.append(f"{run_dir / RESULT_FILE}: {name}'s checkout changed while the run trained ({key} "
                            f"false), so what ran is not the pin; its numbers are not used (delete the checkout: it "
                            f"is cloned again; then {AFRESH})")
    return problems + _split_problems(run_dir, spec, split_file)


def _split_problems(run_dir: Path, spec: RunSpec, split_file: str) -> list[str]:
    named = Path(split_file)
    candidates = [named, run_dir.parent.parent / "splits" / named.name]  # plan_runs: OUT/runs/<name>, OUT/splits
    path = next((p for p in candidates if p.is_file()), None)
    redraw = ("split files are never rewritten: restore it, or move it away and run run_all.py again with the same "
              "flags to draw it again")
    if path is None:
        return [f"{run_dir / SPEC_FILE}: its split file is not found (looked for "
                f"{' and '.join(map(str, candidates))}); restore it to check this run"]
    try:
        payload = read_json(path, "split file")
        sha = indices_sha256(payload["labeled_indices"])
    except (ValueError, KeyError, TypeError) as e:
        return [f"{path}: cannot be read ({type(e).__name__}: {e}); {redraw}"]
    if sha != payload.get("sha256") or sha != spec.split_sha256:
        return [f"{path}: its indices hash to {sha[:16]}, the file says {str(payload.get('sha256'))[:16]} and "
                f"{run_dir / SPEC_FILE} {spec.split_sha256[:16]}; {redraw}"]
    return []


def expected_eval_steps(spec: RunSpec) -> list[int]:
    """Every eval_every steps, and at the last step."""
    steps = list(range(spec.eval_every, spec.steps + 1, spec.eval_every))
    return steps if steps and steps[-1] == spec.steps else steps + [spec.steps]


def _eval_problems(run_dir: Path, result: dict[str, Any], spec: RunSpec) -> tuple[list[str], list[str]]:
    """(problems a finished run's checkpoint recovers: result.json disagrees with intact metrics; problems only a
    fresh start recovers: evaluations lost from metrics.jsonl)."""
    if not (Path(run_dir) / METRICS_FILE).exists():
        return [], [f"{METRICS_FILE} is missing"]
    evals = read_evals(run_dir)
    logged = [e.get("step") for e in evals]
    if logged != expected_eval_steps(spec):
        return [], [f"metrics.jsonl has evaluations at steps {_steps(logged)}, the spec's schedule is "
                    f"{_steps(expected_eval_steps(spec))}"]
    listed = [e.get("step") for e in result.get("evals") or [] if isinstance(e, dict)]
    problems = [] if listed == logged else [f"its evals are at steps {_steps(listed)}, metrics.jsonl's at "
                                            f"{_steps(logged)}"]
    try:  # over the window the result says it used: a result written under an earlier rule stays checkable
        window = result.get("median_window")
        summary = summarize_evals(evals, window if isinstance(window, int) and window > 0 else None)
    except (KeyError, TypeError, ValueError) as e:
        return problems, [f"metrics.jsonl's evaluations cannot be summarized ({type(e).__name__}: {e})"]
    for key in FROM_EVALS:
        got = result.get(key)
        if not isinstance(got, (int, float)) or not math.isclose(got, summary[key], rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"{key} {got} is not {summary[key]}, recomputed from metrics.jsonl")
    return problems, []


def _steps(steps: list) -> str:
    """A list of steps, shortened in the middle when long."""
    return str(steps) if len(steps) <= 6 else f"[{', '.join(map(str, steps[:3]))}, ..., {steps[-1]}] ({len(steps)})"


def flagged_section(flagged: list[dict]) -> list[str]:
    """The report's section for runs with problems (load_run), shown before every table."""
    if not flagged:
        return []
    lines = [f"## ⚠ {len(flagged)} RUN(S) WHOSE FILES DO NOT CHECK OUT: excluded from every table and figure", ""]
    for run in flagged:
        lines.append(f"- **`{run['dir'].name}`**")
        lines += [f"  - {p}" for p in run["problems"]]
    return lines + [""]
