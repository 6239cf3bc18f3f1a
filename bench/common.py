"""What the benchmark scripts share: this project importable when they run from a checkout, the run context a
side-by-side measurement needs, and one-line errors."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))


def run_main(prog: str, main) -> None:
    """sys.exit(main()), with bad input (a device, a data path, a TorchSSL source, a configuration) as one line."""
    from harness.data import DataError
    from third_party.torchssl.checkout import CheckoutError

    try:
        sys.exit(main())
    except (ValueError, OSError, CheckoutError, DataError) as e:
        sys.exit(f"{prog}: error: {e}")


def run_context(data, impls, torchssl_source: str | None, compile_own: bool | None,
                torchssl_workers: int | None = None, usb_source: str | None = None):
    """The RunFiles every run a benchmark makes shares (harness.launch.shared_files): the cached data, this code's
    version, and a verified checkout of each reference (TorchSSL, USB) among `impls`. compile_own None: ours
    compiles as a paper-length run on that device would (own_impl/compile.py's policy), falling back to eager per
    part if that fails; True/False: as asked, binding."""
    import dataclasses

    from harness.launch import shared_files

    shared = shared_files(data.data_dir, compile=compile_own, num_workers=torchssl_workers,
                          torchssl_source=torchssl_source, usb_source=usb_source,
                          need=tuple(ref for ref in ("torchssl", "usb") if ref in impls))
    if compile_own is None:
        shared = dataclasses.replace(shared, compile=True, compile_binding=False)
    return shared
