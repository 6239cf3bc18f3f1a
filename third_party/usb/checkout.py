"""The USB pin (microsoft/Semi-supervised-learning, package `semilearn`: URL + commit) and a verified, cached checkout
of it in CACHE/usb-<commit12> (imports neither torch nor USB). What "verified" means, and the errors:
third_party/checkout.py, shared with TorchSSL's pin."""
from __future__ import annotations

from third_party.checkout import (CLONE_TIMEOUT_S, CheckoutError, CheckoutModified, CheckoutNotTrusted,  # noqa: F401
                                  PinnedCheckout, PinnedCommitMissing, Pin, SourceUnreachable)

URL = "https://github.com/microsoft/Semi-supervised-learning"
COMMIT = "1ef4cbebcc0b368158315aeb425053858cf6c845"  # 2025-09-24, "Merge pull request #254 ... multimatch"
SOURCE_ENV = "USB_SOURCE"
PIN = Pin(name="USB", url=URL, commit=COMMIT, source_env=SOURCE_ENV, source_flag="--usb-source", folder="usb")
HOW_TO_POINT = PIN.how_to_point

_checkout = PinnedCheckout(PIN)
checkout_path = _checkout.checkout_path  # (cache_dir, commit=COMMIT) -> CACHE/usb-<commit12>
resolve_source = _checkout.resolve_source  # (source) -> source, else $USB_SOURCE, else URL
problems = _checkout.problems  # (path, commit=COMMIT) -> what differs from a clean checkout ([] if nothing)
verify_checkout = _checkout.verify_checkout  # (path, commit=COMMIT) -> path, or raises
find_checkout = _checkout.find_checkout  # (cache_dir, commit=COMMIT) -> the verified cached checkout or None
ensure_checkout = _checkout.ensure_checkout  # (source, cache_dir, commit=COMMIT) -> a verified checkout
