"""The TorchSSL pin: clone, verify, reuse, and the three promised one-line errors (no torch, no network needed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import git
import pytest

from third_party.torchssl import checkout as co

from conftest import REPO


def make_source(path: Path) -> str:
    """A tiny git repository with a .gitignore like TorchSSL's; returns its one commit."""
    repo = git.Repo.init(path)
    (path / "fixmatch.py").write_text("print('hello')\n")
    (path / ".gitignore").write_text("__pycache__/\n*.so\ndata/\n")
    repo.index.add(["fixmatch.py", ".gitignore"])
    who = git.Actor("test", "test@example.com")
    commit = repo.index.commit("one commit", author=who, committer=who).hexsha
    repo.close()
    return commit


def test_checkout_of_the_pin_from_a_local_source(tmp_path, torchssl_checkout):
    path = co.ensure_checkout(str(torchssl_checkout), cache_dir=tmp_path)  # the real pin, cloned from a local copy
    assert path == tmp_path / f"torchssl-{co.COMMIT[:12]}"
    with git.Repo(path) as repo:
        assert repo.head.commit.hexsha == co.COMMIT
    assert (path / "models" / "fixmatch" / "fixmatch.py").is_file()
    assert co.problems(path) == []


def test_clone_verify_and_reuse(tmp_path, monkeypatch):
    commit = make_source(tmp_path / "src")
    path = co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    assert path == tmp_path / "cache" / f"torchssl-{commit[:12]}"
    assert (path / "fixmatch.py").read_text() == "print('hello')\n"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name]  # no partial clone left behind

    def no_clone(*args, **kwargs):
        raise AssertionError("a verified cached checkout must be reused, not cloned again")

    monkeypatch.setattr(git.Repo, "clone_from", no_clone)
    assert co.ensure_checkout("/nowhere", cache_dir=tmp_path / "cache", commit=commit) == path


def test_a_changed_checkout_is_refused(tmp_path):
    commit = make_source(tmp_path / "src")
    path = co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    again = lambda: co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)  # noqa

    pyc = path / "__pycache__" / "fixmatch.cpython-311.pyc"
    for make, undo in [
        (lambda: (path / "fixmatch.py").write_text("print('edited')\n"),
         lambda: (path / "fixmatch.py").write_text("print('hello')\n")),
        (lambda: (path / "extra.py").write_text(""), lambda: (path / "extra.py").unlink()),
        (lambda: (path / "utils.so").write_bytes(b"\0"), lambda: (path / "utils.so").unlink()),  # ignored, counts
        # bytecode counts too: the entries never read or write any in a checkout, so a .pyc was put there
        (lambda: (pyc.parent.mkdir(), pyc.write_bytes(b"\0")), lambda: shutil.rmtree(pyc.parent)),
    ]:
        make()
        with pytest.raises(co.CheckoutModified) as err:
            again()
        assert str(path) in str(err.value) and "delete the folder" in str(err.value)
        assert "\n" not in str(err.value)
        undo()
        assert again() == path

    with git.Repo(path) as repo:
        repo.git.checkout("--detach", "--quiet", "HEAD")  # same commit: still fine
    assert again() == path


def test_a_source_without_the_pin_is_refused(tmp_path):
    make_source(tmp_path / "src")
    with pytest.raises(co.PinnedCommitMissing) as err:
        co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert co.COMMIT in msg and str(tmp_path / "src") in msg and "--torchssl-source" in msg and "\n" not in msg
    assert not any((tmp_path / "cache").iterdir())  # nothing half-made is left to be mistaken for a checkout


@pytest.mark.parametrize("source", ["{tmp}/no-such-repo", "http://127.0.0.1:9/TorchSSL.git"])
def test_an_unreachable_source_says_how_to_use_a_local_mirror(tmp_path, source):
    source = source.format(tmp=tmp_path)
    with pytest.raises(co.SourceUnreachable) as err:
        co.ensure_checkout(source, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert source in msg and "--torchssl-source" in msg and co.SOURCE_ENV in msg and "\n" not in msg
    assert not any((tmp_path / "cache").iterdir())


def test_source_and_cache_come_from_the_environment(tmp_path, monkeypatch):
    from harness.env import CACHE_ENV, default_cache_dir

    monkeypatch.setenv(co.SOURCE_ENV, "/some/mirror")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert co.resolve_source(None) == "/some/mirror"
    assert co.resolve_source("/given") == "/given"
    assert co.checkout_path(default_cache_dir()) == tmp_path / f"torchssl-{co.COMMIT[:12]}"
    monkeypatch.delenv(co.SOURCE_ENV)
    assert co.resolve_source(None) == co.URL == "https://github.com/TorchSSL/TorchSSL"


def test_the_harness_can_import_checkout_and_patches_without_torch():
    code = ("import sys, third_party.torchssl.checkout, third_party.torchssl.patches; "
            "bad = [m for m in ('torch', 'train_utils', 'models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ---- what a checkout's git state can hide ----------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="making a folder owned by another user needs root")
def test_a_checkout_owned_by_another_user_is_named_as_such(tmp_path, monkeypatch):
    """git refuses a repository another user owns ("dubious ownership"); that is no missing HEAD, and deleting a
    folder one does not own is not the way out: the error says what git wants."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "empty.gitconfig"))  # no safe.directory of the user's
    (tmp_path / "empty.gitconfig").write_text("")
    commit = make_source(tmp_path / "src")
    path = co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    for p in [path, *path.rglob("*")]:
        os.lchown(p, 12345, 12345)
    with pytest.raises(co.CheckoutError) as err:
        co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    msg = str(err.value)
    assert "dubious ownership" in msg and f"git config --global --add safe.directory {path}" in msg
    assert "HEAD" not in msg and "delete the folder" not in msg and "\n" not in msg
    assert any("dubious ownership" in p for p in co.problems(path, commit))
    (tmp_path / "empty.gitconfig").write_text(f"[safe]\n\tdirectory = {path}\n")  # what the message says to do
    assert co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit) == path


@pytest.mark.parametrize("flag", ["--skip-worktree", "--assume-unchanged"])
def test_index_flags_that_hide_an_edit_count_as_a_change(tmp_path, flag):
    commit = make_source(tmp_path / "src")
    path = co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    with git.Repo(path) as repo:
        repo.git.update_index(flag, "fixmatch.py")
        (path / "fixmatch.py").write_text("print('edited')\n")
        assert repo.git.status("--porcelain", "--ignored", "--untracked-files=all") == ""  # git shows nothing
    with pytest.raises(co.CheckoutModified) as err:
        co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache", commit=commit)
    assert "fixmatch.py" in str(err.value) and flag.strip("-") in str(err.value)


def plant_bytecode(source: Path, extra: str) -> Path:
    """A __pycache__/*.pyc beside `source` that Python would accept for it (the source's mtime and size in its
    header) but that runs `source`'s code plus `extra`."""
    import importlib.util
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    st = source.stat()
    code = compile(source.read_text() + "\n" + extra + "\n", str(source), "exec")
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size))
    return pyc


def test_planted_bytecode_is_never_run_and_counts_as_a_change(tmp_path, torchssl_checkout):
    """A .pyc that matches its source's size and mtime is what Python runs in place of the source, unless the
    process reads no bytecode from the checkout (sys.pycache_prefix outside it). The entry's import must run the
    source, and the checkout's verification must refuse the planted file."""
    path = co.ensure_checkout(str(torchssl_checkout), cache_dir=tmp_path)
    pyc = plant_bytecode(path / "utils.py", "PLANTED = True")
    code = ("import sys; from pathlib import Path; from third_party.torchssl.entry import import_torchssl; "
            f"t = import_torchssl(Path({str(path)!r})); print('planted' if hasattr(t.utils, 'PLANTED') else 'source')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "source"
    assert pyc.exists() and [p for p in path.rglob("*.pyc")] == [pyc]  # nothing else was written
    with pytest.raises(co.CheckoutModified, match="__pycache__"):
        co.verify_checkout(path)
