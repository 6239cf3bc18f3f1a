"""The USB pin: clone, verify, reuse, the one-line errors naming --usb-source / USB_SOURCE, and no bytecode ever
read from the checkout (the git mechanics both pins share are tested on TorchSSL's in test_torchssl_checkout.py)."""
from __future__ import annotations

import subprocess
import sys

import git
import pytest

from third_party.usb import checkout as co

from conftest import REPO
from test_torchssl_checkout import make_source, plant_bytecode


def test_checkout_of_the_pin_from_a_local_source(tmp_path, usb_checkout):
    path = co.ensure_checkout(str(usb_checkout), cache_dir=tmp_path)  # the real pin, cloned from a local copy
    assert path == tmp_path / f"usb-{co.COMMIT[:12]}" == co.checkout_path(tmp_path)
    with git.Repo(path) as repo:
        assert repo.head.commit.hexsha == co.COMMIT == "1ef4cbebcc0b368158315aeb425053858cf6c845"
    assert (path / "semilearn" / "algorithms" / "fixmatch" / "fixmatch.py").is_file()
    assert co.problems(path) == [] and co.find_checkout(tmp_path) == path

    (path / "semilearn" / "nets" / "wrn" / "wrn.py").write_text("# edited\n")
    with pytest.raises(co.CheckoutModified) as err:
        co.find_checkout(tmp_path)
    msg = str(err.value)
    assert msg.startswith("USB checkout") and "wrn.py" in msg and "delete the folder" in msg and "\n" not in msg


def test_a_source_without_the_pin_is_refused(tmp_path):
    make_source(tmp_path / "src")
    with pytest.raises(co.PinnedCommitMissing) as err:
        co.ensure_checkout(str(tmp_path / "src"), cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert co.COMMIT in msg and "USB source" in msg and "--usb-source" in msg and "\n" not in msg
    assert not any((tmp_path / "cache").iterdir())  # nothing half-made is left to be mistaken for a checkout


def test_an_unreachable_source_says_how_to_use_a_local_mirror(tmp_path):
    source = str(tmp_path / "no-such-repo")
    with pytest.raises(co.SourceUnreachable) as err:
        co.ensure_checkout(source, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert source in msg and "--usb-source" in msg and "USB_SOURCE" in msg and "\n" not in msg
    assert isinstance(err.value, co.CheckoutError)  # one hierarchy with TorchSSL's: the harness catches both
    from third_party.torchssl import checkout as torchssl

    assert torchssl.CheckoutError is co.CheckoutError


def test_a_missing_checkout_says_where_one_comes_from(tmp_path):
    with pytest.raises(co.CheckoutError) as err:
        co.verify_checkout(tmp_path / "nothing-here")
    assert "--usb-source" in str(err.value) and co.URL in str(err.value)


def test_source_and_cache_come_from_the_environment(tmp_path, monkeypatch):
    from harness.env import CACHE_ENV, default_cache_dir

    monkeypatch.setenv(co.SOURCE_ENV, "/some/mirror")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert co.SOURCE_ENV == "USB_SOURCE"
    assert co.resolve_source(None) == "/some/mirror" and co.resolve_source("/given") == "/given"
    assert co.checkout_path(default_cache_dir()) == tmp_path / "usb-1ef4cbebcc0b"
    monkeypatch.delenv(co.SOURCE_ENV)
    assert co.resolve_source(None) == co.URL == "https://github.com/microsoft/Semi-supervised-learning"


def test_planted_bytecode_in_usb_is_never_run(tmp_path, usb_checkout):
    """The USB entry's import runs its sources even where a planted .pyc matches their size and mtime."""
    path = co.ensure_checkout(str(usb_checkout), cache_dir=tmp_path)
    pyc = plant_bytecode(path / "semilearn" / "algorithms" / "fixmatch" / "fixmatch.py", "PLANTED = True")
    code = ("from pathlib import Path; from third_party.usb.entry import import_usb; "
            f"u = import_usb(Path({str(path)!r})); print('planted' if hasattr(u.alg, 'PLANTED') else 'source')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "source"
    assert list(path.rglob("*.pyc")) == [pyc]  # nothing else was written
    assert any("__pycache__" in p for p in co.problems(path))


def test_the_harness_can_import_checkout_and_patches_without_torch():
    code = ("import sys, third_party.usb.checkout, third_party.usb.patches; "
            "bad = [m for m in ('torch', 'semilearn') if m in sys.modules]; assert not bad, bad; "
            "print(len(third_party.usb.patches.PATCHES))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
