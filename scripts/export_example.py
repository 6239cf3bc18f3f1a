"""python scripts/export_example.py OUT results/examples/NAME

Copy a results folder's small files into an example folder: every run's spec.json, result.json and metrics.jsonl,
the split files and the identity check's JSON and spec files, with this machine's paths written as `<cache>/...` and
`results/examples/NAME/...`; checkpoints, logs and TensorBoard events are left out. Then rebuild the report there
(`python run_all.py --report-only --out results/examples/NAME` rebuilds it again at any time).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.env import default_cache_dir  # noqa: E402
from harness.report import write_report  # noqa: E402

KEPT = ("spec.json", "result.json", "metrics.jsonl")


def sanitized(text: str, out: Path, dest: Path) -> str:
    return (text.replace(str(default_cache_dir()), "<cache>").replace(str(out), str(dest.relative_to(REPO)))
            .replace(str(REPO), "<repo>"))


def main(out: str, dest: str) -> int:
    out, dest = Path(out).resolve(), (REPO / dest).resolve()
    if dest.exists():
        shutil.rmtree(dest)
    files = [p for p in (out / "runs").glob("*/*") if p.name in KEPT]
    files += list((out / "splits").glob("*.json")) + list((out / "identity").glob("*.json"))
    files += list((out / "identity").glob("*/spec.json"))  # what each identity check's rerun line names
    for src in files:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(sanitized(src.read_text(), out, dest))
    print(f"{len(files)} files copied to {dest}; report: {write_report(dest)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0])
    sys.exit(main(*sys.argv[1:]))
