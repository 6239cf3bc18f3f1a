"""Checkpoint files that survive damage: the latest and the previous one, rotated atomically and durably, and a
reader that falls back to the previous one when the latest cannot be read (either implementation's file format)."""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

# What reading a damaged checkpoint raises: torch.load of a truncated or garbled file (RuntimeError from its zip
# reader, UnpicklingError, EOFError), a file that is not a checkpoint (KeyError, TypeError, ValueError from the
# caller's structural check), an unreadable file (OSError).
UNREADABLE = (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError, AttributeError, IndexError,
              ImportError, pickle.UnpicklingError, zipfile.BadZipFile)


class CheckpointError(ValueError):
    """Neither the latest nor the previous checkpoint can be read; the message names the files and the way out."""


def previous_path(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt; latest_model.pth -> latest_model.prev.pth."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a power loss after this keeps them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a file system without directory handles: the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rotate_in(tmp: Path, path: Path) -> None:
    """Put the finished file `tmp` in place of `path`, keeping the file it replaces as previous_path(path).

    Order: tmp on disk (fsync); the current latest hard-linked to a temporary name and renamed over the previous
    one; tmp renamed over the latest; the folder synced. At every moment `path` is a whole checkpoint (the old
    one or the new one) and the previous one is a whole checkpoint too, so a kill at any point loses nothing."""
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if path.exists():
        prev, link = previous_path(path), path.with_name(path.name + ".prevtmp")
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:  # no hard links here (some network file systems): a copy, synced, does the same
            shutil.copyfile(path, link)
            with open(link, "rb") as f:
                os.fsync(f.fileno())
        os.replace(link, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_rotating(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_path) writes the new checkpoint into a temporary file of this process's own; it then replaces
    `path`, whose old content becomes the previous checkpoint (rotate_in). A write that fails (a full disk: torch
    says only "enforce fail at inline_container.cc") leaves the checkpoints as they were and is an OSError naming
    `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        rotate_in(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        code = getattr(e, "errno", None) or errno.EIO
        why = getattr(e, "strerror", None) or f"{type(e).__name__}: {str(e).splitlines()[0][:120]}; a full disk?"
        raise OSError(code, f"cannot write the checkpoint ({why})", str(path)) from None


def remove_temporaries(folder: Path) -> list[Path]:
    """The temporary files (.NAME.*.tmp) a killed process left in `folder`; for the one process that holds the run
    folder's lock, before it writes anything."""
    found = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _describe(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def read_with_fallback(path: Path, read: Callable[[Path], Any], log: Callable[[str], None]) -> tuple[Any, Path]:
    """(read(path), path) if the latest checkpoint reads; else (read(previous), previous), saying so in the log.
    `read` loads a file and checks it is a checkpoint of the expected form, raising on anything else. With neither
    readable: CheckpointError naming both files and the way out."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return read(path), path
    except UNREADABLE as e:
        latest_error = _describe(e)
    if not prev.exists():
        raise CheckpointError(f"checkpoint {path} cannot be read ({latest_error}) and there is no previous "
                              f"checkpoint {prev.name} beside it; delete {path} to restart this run from step 0")
    try:
        found = read(prev)
    except UNREADABLE as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({latest_error}), nor can the previous one "
                              f"{prev.name} ({_describe(e)}); delete both to restart this run from step 0") from None
    log(f"warning: checkpoint {path} cannot be read ({latest_error}); resuming from the previous checkpoint {prev}")
    return found, prev


def restore_readable(path: Path, read: Callable[[Path], Any], log: Callable[[str], None]) -> Any:
    """For a program that loads `path` itself (TorchSSL's load_model): make `path` a readable checkpoint. When only
    the previous one reads, the damaged latest is kept as NAME.damaged and a copy of the previous one is put in its
    place. Returns what `read` returned for the checkpoint now at `path`."""
    path = Path(path)
    found, used = read_with_fallback(path, read, log)
    if used != path:
        if path.exists():
            os.replace(path, path.with_name(path.name + ".damaged"))
        tmp = path.with_name(path.name + ".tmp")
        shutil.copyfile(used, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        log(f"the damaged checkpoint is kept as {path.name}.damaged; {used.name} was copied to {path.name}")
    return found
