"""The TorchSSL pin (URL + commit) and a verified, cached checkout of it in CACHE/torchssl-<commit12> (imports
neither torch nor TorchSSL). What "verified" means, and the errors: third_party/checkout.py, shared with USB's pin."""
from __future__ import annotations

from third_party.checkout import (CLONE_TIMEOUT_S, CheckoutError, CheckoutModified, CheckoutNotTrusted,  # noqa: F401
                                  PinnedCheckout, PinnedCommitMissing, Pin, SourceUnreachable)

URL = "https://github.com/TorchSSL/TorchSSL"
COMMIT = "f26e1d42967cec7f7c8a00c2e7ff9219d8ab7c92"
SOURCE_ENV = "TORCHSSL_SOURCE"
PIN = Pin(name="TorchSSL", url=URL, commit=COMMIT, source_env=SOURCE_ENV, source_flag="--torchssl-source",
          folder="torchssl")
HOW_TO_POINT = PIN.how_to_point

_checkout = PinnedCheckout(PIN)
checkout_path = _checkout.checkout_path  # (cache_dir, commit=COMMIT) -> CACHE/torchssl-<commit12>
resolve_source = _checkout.resolve_source  # (source) -> source, else $TORCHSSL_SOURCE, else URL
problems = _checkout.problems  # (path, commit=COMMIT) -> what differs from a clean checkout ([] if nothing)
verify_checkout = _checkout.verify_checkout  # (path, commit=COMMIT) -> path, or raises
find_checkout = _checkout.find_checkout  # (cache_dir, commit=COMMIT) -> the verified cached checkout or None
ensure_checkout = _checkout.ensure_checkout  # (source, cache_dir, commit=COMMIT) -> a verified checkout
