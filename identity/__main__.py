"""python -m identity --spec SPEC.json --out OUT.json [--reference torchssl|usb] [--subject own|usb] [--steps K]
    [--networks 28x2 10x1] [--settings stress spec]

The identity check of the spec's algorithm, on the CPU, deterministic, in this process, for one pair: ours (with the
reference's recipe) against TorchSSL (the default) or USB (check.py), or, with --subject usb, USB against TorchSSL
(cross.py). SPEC.json is a run-spec file (contract/spec.py): its settings are the "spec" setting's, its data and
split feed the batches, its torchssl_checkout and usb_checkout are the TorchSSL and USB that run. Writes OUT.json
(one per pair); exit status 0 when the check passed (ours: exact mode identical, as shipped within float noise,
every planted bug caught; USB against TorchSSL: exactly the known findings), 1 when it ran and did not, 2 when it
could not run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

SETTINGS = ("stress", "spec")


def network(text: str) -> tuple[int, int]:
    """"28x2" -> (28, 2): WideResNet depth and width."""
    try:
        depth, widen = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not DEPTHxWIDTH, e.g. 28x2") from None
    if depth < 10 or (depth - 4) % 6 or widen < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: depth must be 6n+4 (10, 16, 22, 28, ...), width >= 1")
    return depth, widen


def without_key(argv: list[str]) -> list[str]:
    """The command line as a user would retype it: the harness's --key left out."""
    out, skip = [], False
    for a in argv:
        if skip or a == "--key":
            skip = not skip
            continue
        out.append(a)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m identity", description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=Path, required=True, help="run-spec file: settings, data, split, checkouts")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--reference", choices=("torchssl", "usb"), default="torchssl",
                   help="the implementation checked against, driven by its own training loop (default torchssl)")
    p.add_argument("--subject", choices=("own", "usb"), default="own",
                   help="what is checked: ours, with the reference's recipe (default), or USB (--reference torchssl)")
    p.add_argument("--steps", type=int, default=20, help="K, steps in lockstep (default 20)")
    p.add_argument("--networks", type=network, nargs="+", default=None,
                   help="WideResNets to run, DEPTHxWIDTH (default: the spec's)")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="stress: every path exercised; spec: the spec's own values (default: both)")
    p.add_argument("--modes", nargs="+", choices=("exact", "shipped"), default=["exact", "shipped"],
                   help="exact: our step with the references' arithmetic; shipped: our training step as it runs, "
                        "against float noise (default: both)")
    p.add_argument("--no-power", action="store_true", help="skip the planted bugs")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--key", default="", help="an identifier stored in OUT.json (the harness's cache key)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    if args.subject == args.reference:
        p.error(f"--subject {args.subject} against itself: choose another --reference")
    if args.subject == "usb" and args.reference != "torchssl":
        p.error("--subject usb is checked against --reference torchssl")
    return args


def load_references(files, algorithm: str, names: list[str]) -> dict:
    """The verified checkouts the spec file names, imported: {"torchssl": its modules, "usb": its modules}."""
    from third_party.torchssl import checkout as torchssl_pin
    from third_party.torchssl.entry import import_torchssl
    from third_party.usb import checkout as usb_pin
    from third_party.usb.entry import import_usb

    how = {"torchssl": (files.torchssl_checkout, torchssl_pin.verify_checkout, import_torchssl),
           "usb": (files.usb_checkout, usb_pin.verify_checkout, import_usb)}
    out = {}
    for name in names:
        path, verify, load = how[name]
        if not path:
            raise ValueError(f"the spec file names no {name}_checkout")
        out[name] = load(verify(Path(path)), algorithm)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from contract.arrays import load_arrays
    from contract.results import write_json_atomic
    from contract.spec import read_spec
    from identity.check import eval_batch, run_check
    from own_impl.data import load_device_data
    from third_party.checkout import CheckoutError
    from third_party.torchssl.checkout import COMMIT
    from third_party.usb.checkout import COMMIT as USB_COMMIT

    pair = [args.subject, args.reference] if args.subject != "own" else [args.reference]
    try:
        spec, files = read_spec(args.spec)
        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)
        device = torch.device("cpu")
        data = load_device_data(spec, files, device)
        arrays = load_arrays(Path(files.data_dir))
        refs = load_references(files, spec.algorithm, pair)
    except (ValueError, OSError, CheckoutError) as e:
        print(f"identity: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    networks = args.networks or [(spec.depth, spec.widen_factor)]
    eval_xy = eval_batch(arrays.test_x, arrays.test_y)
    if args.subject == "usb":
        from identity.cross import run_cross_check

        result = run_cross_check(refs["torchssl"], refs["usb"], spec, data, eval_xy, args.steps, networks,
                                 args.settings)
    else:
        result = run_check(refs[args.reference], spec, data, eval_xy, args.steps, networks, args.settings,
                           power=not args.no_power, shipped="shipped" in args.modes, reference=args.reference)
    commits = {"torchssl": ("torchssl_commit", COMMIT), "usb": ("usb_commit", USB_COMMIT)}
    result.update({
        "seconds": round(time.perf_counter() - t0, 1), "torch_version": torch.__version__, "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}", **dict(commits[name] for name in pair),
        "code_version": files.code_version, "data_sha256": spec.data_sha256, "split_sha256": spec.split_sha256,
        "data_source": files.data_source, "key": args.key,
        "command": " ".join(["python -m identity", *without_key(argv if argv is not None else sys.argv[1:])]),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    v = result["verdict"]
    print(json.dumps({k: v[k] for k in ("exact", "shipped", "power")}, indent=1))
    return 0 if v["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
