"""What the USB tests share (imported by tests/test_usb_*.py): USB's modules imported for a while, and the checks
every USB result owes the spec."""
from __future__ import annotations

from pathlib import Path

from conftest import checkout_modules, reference_result_on_our_split, wrn_count_by_hand

ENTRY = "third_party.usb.entry"


def usb_modules(checkout: Path, *names: str):
    """USB's modules `names`, imported for a while with its import stand-ins installed (checkout_modules)."""
    from third_party.usb import stand_ins

    return checkout_modules(checkout, *names, within=stand_ins.installed())


def usb_wrn_count_by_hand(depth: int = 28, k: int = 2, classes: int = 10) -> int:
    """Parameters of USB's WideResNet: conftest's count (a bias on every conv, as TorchSSL's) less the biases USB's
    residual blocks leave out: conv1 and conv2 of every block and each group's 1x1 shortcut (semilearn/nets/wrn/
    wrn.py:35-44); the stem conv and the classifier keep theirs."""
    n = (depth - 4) // 6
    block_biases, c_in = 0, 16
    for width in (16 * k, 32 * k, 64 * k):
        block_biases += 2 * n * width + (width if c_in != width else 0)
        c_in = width
    return wrn_count_by_hand(depth, k, classes)[0] - block_biases


def usb_checkpoint(run_dir: Path) -> dict:
    """The adapter's resume checkpoint of a USB run folder (USB's save_model content), on the CPU."""
    import torch

    from third_party.usb.patches import numpy_scalar_types

    with torch.serialization.safe_globals(numpy_scalar_types()):
        return torch.load(Path(run_dir) / "usb" / "resume.pth", map_location="cpu", weights_only=True)


def usb_result_on_our_split(run_dir: Path) -> tuple:
    """reference_result_on_our_split for USB, and its pinned clean checkout, the stand-ins never used, nothing written
    into the checkout, and USB's WideResNet-28-2's parameter count. Returns (spec, result)."""
    from third_party.usb import checkout as co

    spec, files, result = reference_result_on_our_split(run_dir, ENTRY)
    assert result["param_count"] == usb_wrn_count_by_hand(28, 2, 10) == 1_467_626
    assert result["usb_commit"] == co.COMMIT and result["usb_checkout_clean"] is True
    assert result["usb_stand_ins_used"] == []  # no stand-in was called, read or iterated
    assert co.problems(files.usb_checkout) == []  # nothing was written into the checkout
    return spec, result
