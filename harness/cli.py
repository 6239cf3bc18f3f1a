"""The command line (`fixmatch-bench`, `python run_all.py`): flags, then data, splits, plan, runs and report."""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from contract.spec import ALGORITHMS, IMPLS, MAX_SEED, PRECISIONS, RECIPES, SETTING_FIELDS
from harness.plan import PRESETS, Plan, UsageError, make_plan
from harness.slurm_options import DEFAULT_MAX_REQUEUES, SlurmRequest

# Flags that override one preset value each: (spec field, type, help).
OVERRIDES = [
    ("steps", int, "optimizer steps per run"), ("eval_every", int, "steps between evaluations"),
    ("batch_size", int, "B, labelled images per step"), ("uratio", int, "mu, unlabelled per labelled"),
    ("lr", float, "initial learning rate"), ("momentum", float, "SGD momentum"),
    ("weight_decay", float, "weight decay"), ("threshold", float, "FixMatch's tau, confidence threshold"),
    ("lambda_u", float, "unlabelled loss weight, for every algorithm's runs (MixMatch: after its ramp-up)"),
    ("ema_decay", float, "EMA decay"),
    ("mixup_alpha", float, "MixMatch's alpha of Beta(alpha, alpha)"),
    ("temperature", float, "MixMatch's T, sharpening temperature"),
    ("ramp_up", float, "MixMatch's ramp-up of lambda_u: the fraction of the steps it takes"),
    ("bn_momentum", float, "BatchNorm momentum (PyTorch convention)"),
    ("depth", int, "WideResNet depth"), ("widen_factor", int, "WideResNet width"),
    ("eval_subset", int, "0: whole test set; n: fixed class-balanced subset"),
    ("eval_batch_size", int, "evaluation batch size"), ("checkpoint_every", int, "steps between checkpoints"),
    ("log_every", int, "steps between training-statistics lines"),
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: only where a flag has one and its help does not already say it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def preset_text(field: str) -> str:
    """What every preset gives `field`, per algorithm where they differ: 'paper 7, MixMatch 1; smoke 2, ...'."""
    from dataclasses import fields as dataclass_fields

    from contract.spec import RunSpec
    from harness.plan import preset_values

    default = {f.name: f.default for f in dataclass_fields(RunSpec)}[field]
    parts = []
    for preset in PRESETS:
        values = {a: preset_values(preset, {}, a).get(field, default) for a in ALGORITHMS}
        values = {a: v for a, v in values.items() if v is not None}
        shown = set(map(str, values.values()))
        if len(shown) == 1:
            parts.append(f"{preset} {shown.pop()}")
        else:
            parts.append(f"{preset} " + ", ".join(f"{a} {v}" for a, v in values.items()))
    values = {p.split(" ", 1)[1] for p in parts}
    return f"every preset {values.pop()}" if len(values) == 1 else "; ".join(parts)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is reported in one line (the usage block is for --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def non_negative_int(text: str) -> int:
    """argparse type for counts where 0 means none (DataLoader workers)."""
    value = int(text)  # a ValueError is argparse's "invalid non_negative_int value"
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; accepted: 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fixmatch-bench", formatter_class=HelpFormatter,
                      description="Run our FixMatch and MixMatch beside TorchSSL's and USB's on CIFAR-10 and "
                                  "write the report.", allow_abbrev=False)
    p.add_argument("command", nargs="?", default="run", choices=["run", "identity"],
                   help="run: the identity check, the training runs and the report; identity: the identity check "
                        "and the report only")
    p.add_argument("--budgets", type=int, nargs="+", default=[40, 250, 4000],
                   help="label budgets: labelled images in total, positive multiples of 10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help=f"seeds (0..{MAX_SEED}); each draws its split")
    p.add_argument("--algorithms", nargs="+", default=["fixmatch"], choices=list(ALGORITHMS),
                   help="algorithms to run, each with its own defaults (contract/spec.py ALGORITHM_DEFAULTS) "
                        "(default: fixmatch)")
    p.add_argument("--impls", nargs="+", default=["own", "torchssl"], choices=list(IMPLS),
                   help="implementations to run")
    p.add_argument("--recipes", nargs="+", default=["paper"], choices=list(RECIPES),
                   help="recipes our implementation runs, once each (each reference runs its own): paper; "
                        "torchssl (or usb) to check the implementation against TorchSSL (USB) on one recipe; "
                        "paper-cta: the paper with CTAugment (FixMatch only)")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="settings preset")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpus", type=int, nargs="+", default=None,
                   help="GPU indices to spread runs over, one run per GPU at a time (implies CUDA)")
    p.add_argument("--data", default=None,
                   help="CIFAR-10 source: torchvision folder, cifar-10-python.tar.gz, image-folder tree or its "
                        ".tar/.tar.gz (default: $FIXMATCH_BENCH_DATA, else torchvision's download into the cache)")
    p.add_argument("--torchssl-source", default=None,
                   help="git URL or local path/mirror to clone TorchSSL from "
                        "(default: $TORCHSSL_SOURCE, else https://github.com/TorchSSL/TorchSSL)")
    p.add_argument("--usb-source", default=None,
                   help="git URL or local path/mirror to clone USB from "
                        "(default: $USB_SOURCE, else https://github.com/microsoft/Semi-supervised-learning)")
    p.add_argument("--out", default="results", help="results folder: splits/, runs/, RESULTS.md, figures/")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded data and the TorchSSL and USB checkouts are cached "
                        "(default: $FIXMATCH_BENCH_CACHE, else ~/.cache/fixmatch_bench)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write the split files only")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md and figures from result files")
    p.add_argument("--no-warmup", action="store_true", help="skip the measured warm-up and time estimate")
    p.add_argument("--no-identity", action="store_true",
                   help="skip the identity check (ours and each reference's training code in lockstep on the CPU, "
                        "run first whenever two implementations of an algorithm are asked for)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our augmentation and training step (default: own_impl/compile.py's policy: "
                        "on for CUDA, and on the CPU for runs of 1000 steps or more); not part of the run spec")
    p.add_argument("--reference-workers", "--torchssl-workers", dest="reference_workers", type=non_negative_int,
                   default=None, help="TorchSSL's and USB's DataLoader workers (TorchSSL's unlabelled loader gets 4x, "
                                      "USB's 2x; default: their configs' 1)")
    add_launcher_flags(p)
    g = p.add_argument_group("overrides of the preset's values",
                             "each applies to every algorithm's runs, except an algorithm's own setting (--threshold; "
                             "--mixup-alpha, --temperature, --ramp-up), which applies to that algorithm's runs only")
    for name, typ, hint in OVERRIDES:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"{hint} (presets: {preset_text(name)})")
    g.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help=f"fp32 (full fp32), tf32 (TF32 on CUDA) or bf16 autocast (presets: {preset_text('precision')})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum (presets: {preset_text('nesterov')})")
    g.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help=f"channels_last memory format (presets: {preset_text('channels_last')})")
    return p


def add_launcher_flags(p: argparse.ArgumentParser) -> None:
    """--launcher, --status, and the Slurm launcher's flags (SlurmRequest's fields)."""
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="where runs execute: subprocesses on this machine, or one Slurm job each (docs/slurm.md)")
    p.add_argument("--status", action="store_true",
                   help="print the state of every run under --out (done, queued, running, failed, ...) and exit")
    g = p.add_argument_group("Slurm (with --launcher slurm; every value is checked before any job is submitted)")
    g.add_argument("--partition", help="partition for the jobs (default: the cluster's default partition)")
    g.add_argument("--account", help="account to charge the jobs to")
    g.add_argument("--qos", help="quality of service of the jobs")
    g.add_argument("--time", help="time limit per job: minutes, or D-HH:MM:SS (default: the partition's default); "
                                  "a run longer than that is requeued and resumes")
    g.add_argument("--gpus-per-job", type=int, default=None, help="GPUs per job (default: 1; 0 with --device cpu)")
    g.add_argument("--cpus-per-job", type=int, default=None, help="CPUs per job (default: the cluster's)")
    g.add_argument("--mem", help="memory per job, e.g. 32G (default: the cluster's)")
    g.add_argument("--sbatch", action="append", default=None, metavar="KEY=VALUE",
                   help="one more sbatch option, e.g. constraint=a100 or exclusive (repeatable)")
    g.add_argument("--max-jobs", type=int, default=None, help="most jobs queued or running at once (default: all)")
    g.add_argument("--max-requeues", type=int, default=None,
                   help=f"most times a job is requeued after a time limit or pre-emption "
                        f"(default: {DEFAULT_MAX_REQUEUES}); a later call submits the run again")
    g.add_argument("--no-wait", action="store_true", help="submit the jobs and return (see --status)")
    g.add_argument("--allow-local-out", action="store_true",
                   help="accept an --out or cache folder on storage that looks local to this machine (e.g. under "
                        "/tmp), when the nodes do see it, as on a one-machine cluster")


SLURM_FLAGS = tuple(f.name for f in dataclasses.fields(SlurmRequest) if f.name not in ("device", "gpus"))


def slurm_request(args: argparse.Namespace) -> SlurmRequest | None:
    """The Slurm flags as one typed object for --launcher slurm; None for the local launcher, which refuses them."""
    given = {f: getattr(args, f) for f in SLURM_FLAGS if getattr(args, f) not in (None, False)}
    if args.launcher == "local":
        if given:
            raise UsageError(f"--{next(iter(given)).replace('_', '-')} applies to Slurm jobs only; add --launcher "
                             f"slurm")
        return None
    return SlurmRequest(device=args.device, gpus=args.gpus, **given)


def overrides(args: argparse.Namespace) -> dict:
    """The preset values the flags override: only the flags given."""
    return {k: getattr(args, k) for k in SETTING_FIELDS if getattr(args, k, None) is not None}


def main(argv: list[str] | None = None) -> int:
    """The console script: every way the command ends is an exit code and, for an error, one line."""
    from harness.data import DataError
    from third_party.torchssl.checkout import CheckoutError  # gitpython only: no TorchSSL, no torch

    args = build_parser().parse_args(argv)
    if args.command == "identity" and args.no_identity:
        print("error: identity --no-identity asks for nothing; leave one out (see --help)", file=sys.stderr)
        return 2
    # A kill, or a hang-up (closed terminal, dropped ssh), checkpoints the running runs, like Ctrl-C.
    previous = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return run(args)
    except (ValueError, OSError, CheckoutError, DataError) as e:  # UsageError, SplitError are ValueErrors
        if isinstance(e, OSError) and e.filename is not None:  # e.g. --out naming a file: "[Errno 20] ..." made plain
            also = f" -> {e.filename2}" if e.filename2 is not None else ""
            print(f"error: {e.strerror}: {e.filename}{also}", file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept, interrupted ones resume from their checkpoint on the next call",
              file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from harness.env import default_cache_dir, user_path

    out = user_path(args.out)
    if args.status:
        from harness.status import print_status

        return print_status(out)
    if args.report_only:
        if not out.is_dir():
            raise ValueError(f"--out {out} does not exist; --report-only rebuilds the report of an existing "
                             f"results folder")
        return _report(out)
    request = slurm_request(args)
    slurm = None
    if request is not None:  # every Slurm option and the cluster checked before any work
        from harness.slurm_options import slurm_options

        slurm = slurm_options(request, out, user_path(args.cache_dir) if args.cache_dir else default_cache_dir())
    plan = make_plan(budgets=args.budgets, seeds=args.seeds, impls=args.impls, recipes=args.recipes,
                     algorithms=args.algorithms, preset=args.preset,
                     overrides=overrides(args), out_dir=out, device=args.device, gpus=args.gpus,
                     data=args.data or os.environ.get("FIXMATCH_BENCH_DATA"),
                     cache_dir=user_path(args.cache_dir) if args.cache_dir else None,
                     devices=[slurm.device] if slurm else None)
    print(plan.describe())
    if args.dry_run:
        return 0

    from harness.identity import pairs_to_check, run_identity
    from harness.launch import pending, shared_files

    check = [] if args.no_identity else pairs_to_check(plan.runs)
    todo = [] if args.command == "identity" else pending(plan.runs)
    need = {r.spec.impl for r in todo} | {name for p in check for name in (p.subject, p.reference)}
    shared = shared_files(plan.data.data_dir, data_source=plan.data_source, compile=args.compile,
                          num_workers=args.reference_workers, torchssl_source=args.torchssl_source,
                          usb_source=args.usb_source, cache_dir=plan.cache_dir,
                          need=tuple(n for n in ("torchssl", "usb") if n in need))
    if check:  # before any training: a minute or two on the CPU; a failed check is reported, runs go on
        run_identity(plan.runs, out, shared)
    failed = execute(todo, shared, slurm, plan, warmup=not args.no_warmup) if todo else []
    if failed:  # said first: a report that cannot be written must not hide it
        print(f"{len(failed)} of {len(plan.runs)} runs failed: {', '.join(r.spec.name for r in failed)}",
              file=sys.stderr)
    try:
        _report(out)
    except OSError as e:
        print(f"error: the report could not be written: {e.strerror}: {e.filename}", file=sys.stderr)
        return 1 if failed else 2
    return 1 if failed else 0


def execute(todo: list, shared, slurm, plan: Plan, warmup: bool) -> list:
    """The runs not done yet, by the launcher asked for; returns those that failed."""
    from harness.lifeline import clean_stale
    from harness.runner import LocalScheduler, warmup_estimate, warmup_root

    clean_stale(warmup_root(plan.runs))  # what a killed call's warm-up left
    if slurm is not None:  # jobs on a cluster: nothing is timed on this machine
        from harness.slurm import SlurmScheduler

        return SlurmScheduler(todo, shared, slurm).run()
    if warmup:
        est = warmup_estimate(todo, shared, len(plan.data.test_y), plan.devices[0])
        if est is not None:
            print(f"estimated time for {len(todo)} runs on {len(plan.devices)} device(s): "
                  f"{est / len(plan.devices) / 60:.1f} min")
    return LocalScheduler(todo, shared, plan.devices).run()


def _report(out: Path) -> int:
    from harness.report import write_report

    print(f"report: {write_report(out)}")
    return 0


__all__ = ["Plan", "build_parser", "main"]
