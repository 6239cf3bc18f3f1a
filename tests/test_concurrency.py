"""Several processes at once on one fresh data cache and one fresh results folder, as on a shared cluster: real
`run_all.py --dry-run` processes started together, a few trials; none may fail, and the cache entry and split files
they leave must be whole."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from contract.arrays import ARRAY_NAMES, indices_sha256

from conftest import REPO

PROCESSES, TRIALS = 3, 2  # before the fix, three at once failed in each of two trials (fixed temporary names)
BUDGETS, SEEDS = ("40", "250"), ("0", "1")  # four split files drawn at once by every process


def test_first_use_of_one_cache_and_one_out_by_several_processes_at_once(shared_archive, cifar, tmp_path, capfd):
    from harness.data import load_cifar10
    from harness.splits import ensure_split

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for trial in range(TRIALS):
        cache, out = tmp_path / f"cache-{trial}", tmp_path / f"out-{trial}"
        procs = [subprocess.Popen([sys.executable, str(REPO / "run_all.py"), "--dry-run", "--data",
                                   str(shared_archive), "--budgets", *BUDGETS, "--seeds", *SEEDS, "--out", str(out),
                                   "--cache-dir", str(cache)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
        failures = []
        for i, proc in enumerate(procs):
            err = proc.communicate(timeout=600)[1]
            if proc.returncode != 0:
                failures.append(f"process {i}: exit {proc.returncode}: {err.strip()[-300:]}")
        assert failures == [], f"trial {trial}"

        # One whole cache entry, read back as it is (no rebuild: nothing said), holding the session's pixels.
        entries = [p for p in (cache / "arrays").iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert [p.name for p in entries] == [cifar.data_dir.name]
        assert sorted(p.name for p in entries[0].iterdir()) == sorted([f"{n}.npy" for n in ARRAY_NAMES] +
                                                                      ["identity.json"])
        capfd.readouterr()
        assert load_cifar10(shared_archive, cache_dir=cache).identity == cifar.identity
        assert capfd.readouterr().err == ""
        assert not [p.name for p in (cache / "arrays").iterdir() if p.is_dir() and p.name.startswith(".")]

        # Every split file whole, and the split this data set gives for its budget and seed.
        assert sorted(p.name for p in (out / "splits").iterdir()) == \
            sorted(f"cifar10-{n}-seed{s}.json" for n in BUDGETS for s in SEEDS)
        for n in BUDGETS:
            for s in SEEDS:
                split = json.loads((out / "splits" / f"cifar10-{n}-seed{s}.json").read_text())
                _, sha = ensure_split(tmp_path / "ref", "cifar10", cifar.train_y, int(n), int(s),
                                      cifar.identity.data_sha256)
                assert split["sha256"] == indices_sha256(split["labeled_indices"]) == sha
