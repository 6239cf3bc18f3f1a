"""What the harness knows of where it runs: the cache folder, this code's version, the machine, and paths from the
user made absolute once."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

CACHE_ENV = "FIXMATCH_BENCH_CACHE"  # where decoded data and the TorchSSL checkout are cached
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding harness/, own_impl/, contract/, third_party/


def user_path(value: str | os.PathLike) -> Path:
    """A path from a flag or the environment: ~ expanded and made absolute against the current directory, once, so
    that child processes started in other folders see the same place."""
    return Path(os.path.expanduser(os.fspath(value))).resolve()


def default_cache_dir() -> Path:
    """$FIXMATCH_BENCH_CACHE if set and not empty, else ~/.cache/fixmatch_bench; absolute."""
    return user_path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fixmatch_bench")


def code_version(repo_dir: Path = PACKAGE_ROOT) -> str:
    """The git commit of this project (with -dirty when the tree has uncommitted changes); for an installed copy
    without git, the package version ("fixmatch-bench 0.1.0"); else "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=repo_dir, capture_output=True,
                              text=True, timeout=10).stdout.split()
        if len(head) == 2 and Path(head[0]).resolve() == Path(repo_dir).resolve():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head[1] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"fixmatch-bench {version('fixmatch-bench')}"
    except PackageNotFoundError:
        return "unknown"


def machine_info(device: str) -> str:
    """One line naming the machine a run uses: the accelerator if any, else the CPU model and core count."""
    if device.startswith("cuda"):
        try:
            import torch

            return f"{torch.cuda.get_device_name(torch.device(device))} ({platform.node() or 'host'})"
        except Exception:  # a device name is a label: never fail a run over it
            return device
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"
