"""The TorchSSL pin (URL + commit) and a verified, cached checkout of it (imports neither torch nor TorchSSL).

A checkout lives in CACHE/torchssl-<commit12>, CACHE being the folder the caller names (the harness's cache folder:
$FIXMATCH_BENCH_CACHE, default ~/.cache/fixmatch_bench).
It is verified every time it is used: HEAD must be the pinned commit and the tree clean, where clean means
`git status` shows nothing, ignored files included, except Python's own `__pycache__/` bytecode folders (Python
checks those against the source's size and mtime before use, and the entry never writes them: it runs with
sys.dont_write_bytecode). Ignored files count because TorchSSL's .gitignore hides things that could change what
runs or hint the folder was used as a working directory (`*.so`, `lib/`, `data/`, `saved_models/`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


URL = "https://github.com/TorchSSL/TorchSSL"
COMMIT = "f26e1d42967cec7f7c8a00c2e7ff9219d8ab7c92"
SOURCE_ENV = "TORCHSSL_SOURCE"
CLONE_TIMEOUT_S = 900  # a full clone of TorchSSL is tens of MB; a stalled network fails instead of hanging
HOW_TO_POINT = (f"point at a local clone or mirror with --torchssl-source PATH (run_all.py) "
                f"or {SOURCE_ENV}=PATH")


class CheckoutError(RuntimeError):
    """TorchSSL could not be made available at the pinned commit; the message is one line and says what to do."""


class SourceUnreachable(CheckoutError):
    """The git source could not be cloned (no network, wrong URL, missing path)."""


class PinnedCommitMissing(CheckoutError):
    """The source was cloned but does not contain the pinned commit."""


class CheckoutModified(CheckoutError):
    """A cached checkout is not exactly the pinned commit: another HEAD, changed, untracked or ignored files."""


def checkout_path(cache_dir: Path, commit: str = COMMIT) -> Path:
    return (Path(cache_dir) / f"torchssl-{commit[:12]}").resolve()  # absolute: TorchSSL's run changes directory


def resolve_source(source: str | None) -> str:
    """The clone source: the argument, else $TORCHSSL_SOURCE, else the GitHub URL of the pin."""
    return source or os.environ.get(SOURCE_ENV) or URL


def _import_git():
    """gitpython, which needs the git program: either missing is one clear CheckoutError."""
    try:
        import git
    except ImportError as e:
        raise CheckoutError(f"cannot use git to check TorchSSL out ({str(e).splitlines()[0]}); install the git "
                            f"program and the gitpython package") from None
    return git


def _git(repo_dir: Path):
    git = _import_git()

    repo = git.Repo(repo_dir)
    # status must not take the index lock: several runs may verify one checkout at the same time
    repo.git.update_environment(GIT_OPTIONAL_LOCKS="0")
    return repo


def _last_line(err: Exception) -> str:
    text = str(getattr(err, "stderr", "") or err).strip()
    lines = [ln.strip(" '\"") for ln in text.splitlines() if ln.strip(" '\"")]
    return lines[-1] if lines else type(err).__name__


def problems(path: Path, commit: str = COMMIT) -> list[str]:
    """What makes `path` differ from a clean checkout of `commit` (empty: it is one)."""
    git = _import_git()

    path = Path(path)
    if not (path / ".git").exists():
        return [f"{path} is not a git checkout"]
    try:
        repo = _git(path)
    except git.exc.GitError as e:
        return [f"{path} is not a readable git checkout ({_last_line(e)})"]
    with repo:
        try:
            head = repo.head.commit.hexsha
        except ValueError:  # no commit at all
            return [f"{path} has no HEAD commit"]
        if head != commit:
            return [f"HEAD is {head[:12]}, not the pinned {commit[:12]}"]
        status = repo.git.status("--porcelain", "--ignored", "--untracked-files=all")
    found = []
    for line in status.splitlines():
        code, name = line[:2], line[3:]
        if code == "!!" and "__pycache__" in Path(name).parts:
            continue
        found.append(line.strip())
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return [f"{len(found)} changed, untracked or ignored file(s): {shown}"]
    return []


def verify_checkout(path: Path, commit: str = COMMIT) -> Path:
    """Raise CheckoutModified unless `path` is a clean checkout of `commit`; return the path."""
    if not Path(path).exists():
        raise CheckoutError(f"TorchSSL checkout {path} does not exist; ensure_checkout() (run by run_all.py) "
                            f"makes one, from --torchssl-source / {SOURCE_ENV} or GitHub")
    found = problems(path, commit)
    if found:
        raise CheckoutModified(f"TorchSSL checkout {path} is not a clean checkout of {commit[:12]}: {found[0]}; "
                               f"delete the folder and it is cloned again")
    return Path(path)


def find_checkout(cache_dir: Path, commit: str = COMMIT) -> Path | None:
    """The cached checkout if it exists and verifies; None if it is absent (a modified one raises)."""
    path = checkout_path(cache_dir, commit)
    return verify_checkout(path, commit) if path.exists() else None


def ensure_checkout(source: str | None, cache_dir: Path, commit: str = COMMIT) -> Path:
    """A verified checkout of `commit`: the cached one if present, else cloned from `source` into the cache.

    `source`: any git URL or local path (a clone, a bare repository or a mirror); None means $TORCHSSL_SOURCE, else
    the GitHub URL. A cached checkout is reused whatever its origin: its HEAD and tree are what is verified.
    """
    git = _import_git()

    dest = checkout_path(cache_dir, commit)
    if dest.exists():
        return verify_checkout(dest, commit)
    source = resolve_source(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"  # renamed into place only once verified
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            repo = git.Repo.clone_from(source, tmp, no_checkout=True, env={"GIT_TERMINAL_PROMPT": "0"},
                                       kill_after_timeout=CLONE_TIMEOUT_S)
        except git.exc.GitError as e:
            raise SourceUnreachable(f"cannot clone TorchSSL from {source} ({_last_line(e)}); "
                                    f"without internet access, {HOW_TO_POINT}") from None
        with repo:
            if not _has_commit(repo, commit):
                try:  # a commit that no branch or tag of the source reaches can still be fetched by its id
                    repo.git.fetch("origin", commit, kill_after_timeout=CLONE_TIMEOUT_S)
                except git.exc.GitError:
                    pass
            if not _has_commit(repo, commit):
                raise PinnedCommitMissing(f"TorchSSL source {source} does not contain the pinned commit {commit}; "
                                          f"{HOW_TO_POINT} that has it")
            repo.git.checkout("--detach", "--quiet", commit)
        verify_checkout(tmp, commit)
        try:
            tmp.rename(dest)
        except OSError:  # another process finished the same checkout first: use theirs
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verify_checkout(dest, commit)


def _has_commit(repo, commit: str) -> bool:
    git = _import_git()

    try:
        repo.git.cat_file("-e", f"{commit}^{{commit}}")
        return True
    except git.exc.GitError:
        return False
