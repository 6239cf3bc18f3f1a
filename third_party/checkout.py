"""A pinned third-party repository (URL + commit) and a verified, cached checkout of it; one Pin per reference
implementation (third_party/torchssl/checkout.py, third_party/usb/checkout.py). Imports neither torch nor the pinned
code.

A checkout lives in CACHE/<folder>-<commit12>, CACHE being the folder the caller names (the harness's cache folder:
$FIXMATCH_BENCH_CACHE, default ~/.cache/fixmatch_bench). It is verified every time it is used: HEAD must be the
pinned commit and the tree clean, where clean means all of:

- `git status` shows nothing, ignored files included (a pinned repository's .gitignore hides things that could
  change what runs, such as `*.so`, `lib/` or `data/`), and `__pycache__/` bytecode included: the entries never
  read bytecode from a checkout (third_party/adapter.py: import_from_checkout points sys.pycache_prefix at an empty
  folder outside it and writes none), so a `.pyc` there can only be something someone put there;
- no file carries an index flag that hides its edits from `git status` (`git update-index --skip-worktree` or
  `--assume-unchanged`; `git ls-files -v` shows them);
- git reads the repository as it is: replace refs are ignored (GIT_NO_REPLACE_OBJECTS).

A folder git refuses to read because another user owns it ("dubious ownership") is reported as exactly that, with
the command git asks for, since deleting a folder one does not own is rarely possible or wise.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CLONE_TIMEOUT_S = 900  # a full clone is tens of MB; a stalled network fails instead of hanging
# git commands must neither take the index lock (several runs may verify one checkout at the same time) nor let
# replace refs substitute other objects for the pinned ones.
GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0", "GIT_NO_REPLACE_OBJECTS": "1", "GIT_TERMINAL_PROMPT": "0"}


class CheckoutError(RuntimeError):
    """A pinned repository could not be made available at its commit; the message is one line and says what to do."""


class SourceUnreachable(CheckoutError):
    """The git source could not be cloned (no network, wrong URL, missing path)."""


class PinnedCommitMissing(CheckoutError):
    """The source was cloned but does not contain the pinned commit."""


class CheckoutModified(CheckoutError):
    """A cached checkout is not exactly the pinned commit: another HEAD, changed, untracked or ignored files, or
    index flags that hide edits."""


class CheckoutNotTrusted(CheckoutError):
    """git refuses to read the checkout: another user owns it (git's safe.directory check)."""


@dataclass(frozen=True)
class Pin:
    """One pinned repository: what it is called, where it comes from, and where its checkout is cached."""

    name: str  # for messages: "TorchSSL", "USB"
    url: str  # the default source
    commit: str  # 40 hex digits
    source_env: str  # the environment variable naming another source (a local clone or mirror)
    source_flag: str  # run_all.py's flag for the same
    folder: str  # the cache folder's prefix: <cache>/<folder>-<commit12>

    @property
    def how_to_point(self) -> str:
        return (f"point at a local clone or mirror with {self.source_flag} PATH (run_all.py) "
                f"or {self.source_env}=PATH")


class PinnedCheckout:
    """The checkout operations of one Pin; each pin module binds its methods to module-level names. `commit`
    arguments default to the pin's."""

    def __init__(self, pin: Pin):
        self.pin = pin

    def checkout_path(self, cache_dir: Path, commit: str | None = None) -> Path:
        commit = commit or self.pin.commit
        return (Path(cache_dir) / f"{self.pin.folder}-{commit[:12]}").resolve()  # absolute: runs change directory

    def resolve_source(self, source: str | None) -> str:
        """The clone source: the argument, else $<SOURCE_ENV>, else the pin's URL."""
        return source or os.environ.get(self.pin.source_env) or self.pin.url

    def problems(self, path: Path, commit: str | None = None) -> list[str]:
        """What makes `path` differ from a clean checkout of `commit` (empty: it is one)."""
        try:
            return _problems(Path(path), commit or self.pin.commit, self.pin.name)
        except CheckoutNotTrusted as e:
            return [str(e)]

    def verify_checkout(self, path: Path, commit: str | None = None) -> Path:
        """Raise unless `path` is a clean checkout of `commit` (CheckoutModified; CheckoutNotTrusted where git
        refuses to read it); return the path."""
        commit, pin = commit or self.pin.commit, self.pin
        if not Path(path).exists():
            raise CheckoutError(f"{pin.name} checkout {path} does not exist; ensure_checkout() (run by run_all.py) "
                                f"makes one, from {pin.source_flag} / {pin.source_env} or {pin.url}")
        found = _problems(Path(path), commit, pin.name)
        if found:
            raise CheckoutModified(f"{pin.name} checkout {path} is not a clean checkout of {commit[:12]}: "
                                   f"{found[0]}; delete the folder and it is cloned again")
        return Path(path)

    def find_checkout(self, cache_dir: Path, commit: str | None = None) -> Path | None:
        """The cached checkout if it exists and verifies; None if it is absent (a modified one raises)."""
        path = self.checkout_path(cache_dir, commit)
        return self.verify_checkout(path, commit) if path.exists() else None

    def ensure_checkout(self, source: str | None, cache_dir: Path, commit: str | None = None) -> Path:
        """A verified checkout of `commit`: the cached one if present, else cloned from `source` into the cache.

        `source`: any git URL or local path (a clone, a bare repository or a mirror); None means $<SOURCE_ENV>,
        else the pin's URL. A cached checkout is reused whatever its origin: its HEAD and tree are what is verified.
        """
        git = _import_git(self.pin.name)
        commit, pin = commit or self.pin.commit, self.pin
        dest = self.checkout_path(cache_dir, commit)
        if dest.exists():
            return self.verify_checkout(dest, commit)
        source = self.resolve_source(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"  # renamed into place only once verified
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            try:
                repo = git.Repo.clone_from(source, tmp, no_checkout=True, env=GIT_ENV,
                                           kill_after_timeout=CLONE_TIMEOUT_S)
            except git.exc.GitError as e:
                raise SourceUnreachable(f"cannot clone {pin.name} from {source} ({_last_line(e)}); "
                                        f"without internet access, {pin.how_to_point}") from None
            with repo:
                repo.git.update_environment(**GIT_ENV)
                if not _has_commit(repo, commit):
                    try:  # a commit that no branch or tag of the source reaches can still be fetched by its id
                        repo.git.fetch("origin", commit, kill_after_timeout=CLONE_TIMEOUT_S)
                    except git.exc.GitError:
                        pass
                if not _has_commit(repo, commit):
                    raise PinnedCommitMissing(f"{pin.name} source {source} does not contain the pinned commit "
                                              f"{commit}; {pin.how_to_point} that has it")
                repo.git.checkout("--detach", "--quiet", commit)
            self.verify_checkout(tmp, commit)
            try:
                tmp.rename(dest)
            except OSError:  # another process finished the same checkout first: use theirs
                if not dest.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.verify_checkout(dest, commit)


def _import_git(name: str):
    """gitpython, which needs the git program: either missing is one clear CheckoutError."""
    try:
        import git
    except ImportError as e:
        raise CheckoutError(f"cannot use git to check {name} out ({str(e).splitlines()[0]}); install the git "
                            f"program and the gitpython package") from None
    return git


def _last_line(err: Exception) -> str:
    text = str(getattr(err, "stderr", "") or err).strip()
    lines = [ln.strip(" '\"") for ln in text.splitlines() if ln.strip(" '\"")]
    return lines[-1] if lines else type(err).__name__


def _refused_as_untrusted(err: Exception, path: Path, name: str) -> None:
    """Raise CheckoutNotTrusted if git refused `path` for its owner (its stderr says 'dubious ownership')."""
    if "dubious ownership" in str(getattr(err, "stderr", "") or err):
        raise CheckoutNotTrusted(
            f"git refuses to read the {name} checkout {path}: another user owns it (git's 'dubious ownership' "
            f"check); if you trust that folder, run `git config --global --add safe.directory {path}`, or point "
            f"--cache-dir at a folder of your own") from None


INDEX_FLAGS = {"S": "skip-worktree", "s": "skip-worktree and assume-unchanged"}  # other lowercase: assume-unchanged


def _problems(path: Path, commit: str, name: str) -> list[str]:
    """problems(), raising CheckoutNotTrusted where git refuses the folder."""
    git = _import_git(name)
    if not (path / ".git").exists():
        return [f"{path} is not a git checkout"]
    try:
        repo = git.Repo(path)
    except git.exc.GitError as e:
        return [f"{path} is not a readable git checkout ({_last_line(e)})"]
    with repo:
        repo.git.update_environment(**GIT_ENV)
        try:
            # a git command, not gitpython's own reading of .git, so that git's refusals show as what they are
            head = repo.git.rev_parse("--verify", "HEAD^{commit}")
        except git.exc.GitCommandError as e:
            _refused_as_untrusted(e, path, name)
            return [f"{path} has no HEAD commit ({_last_line(e)})"]
        if head != commit:
            return [f"HEAD is {head[:12]}, not the pinned {commit[:12]}"]
        try:
            status = repo.git.status("--porcelain", "--ignored", "--untracked-files=all")
            index = repo.git.ls_files("-v")
        except git.exc.GitCommandError as e:
            _refused_as_untrusted(e, path, name)
            return [f"{path} is not a readable git checkout ({_last_line(e)})"]
    found = [line.strip() for line in status.splitlines() if line.strip()]
    for line in index.splitlines():  # "H name": a plain tracked file; "S": skip-worktree; lowercase: assume-unchanged
        tag, file = line[:1], line[2:]
        if tag != "H":
            flag = INDEX_FLAGS.get(tag, "assume-unchanged" if tag.islower() else f"index tag {tag!r}")
            found.append(f"{file} is marked {flag} in the index, which hides its edits from git status")
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return [f"{len(found)} changed, untracked, ignored or hidden file(s): {shown}"]
    return []


def _has_commit(repo, commit: str) -> bool:
    git = _import_git("the pinned repository")
    try:
        repo.git.cat_file("-e", f"{commit}^{{commit}}")
        return True
    except git.exc.GitError:
        return False
