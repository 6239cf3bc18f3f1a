#!/usr/bin/env python
"""Run our FixMatch and TorchSSL's side by side on CIFAR-10 and write the report (flags only; logic in harness)."""
import argparse
import sys

from contract.spec import IMPLS, PRECISIONS
from harness.plan import PRESETS
from harness.main import main


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is reported in one line (the usage block is for --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--budgets", type=int, nargs="+", default=[40, 250, 4000],
                   help="label budgets: labelled images in total, positive multiples of 10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; each draws its own split")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS),
                   help="implementations to run")
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
    p.add_argument("--out", default="results", help="results folder: splits/, runs/, RESULTS.md, figures/")
    p.add_argument("--cache-dir", default=None,
                   help="where decoded data and the TorchSSL checkout are cached "
                        "(default: $FIXMATCH_BENCH_CACHE, else ~/.cache/fixmatch_bench)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write the split files only")
    p.add_argument("--report-only", action="store_true", help="rebuild RESULTS.md and figures from result files")
    p.add_argument("--no-warmup", action="store_true", help="skip the measured warm-up and time estimate")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our augmentation and training step (default: on for CUDA, and on the CPU "
                        "for runs of 1000 steps or more); same pixels, results within float tolerance, so it is not "
                        "part of the run spec")
    g = p.add_argument_group("overrides of the preset's values")
    for name, typ, hint in [
        ("steps", int, "optimizer steps per run"), ("eval_every", int, "steps between evaluations"),
        ("batch_size", int, "B, labelled images per step"), ("uratio", int, "mu, unlabelled per labelled"),
        ("lr", float, "initial learning rate"), ("momentum", float, "SGD momentum"),
        ("weight_decay", float, "weight decay"), ("threshold", float, "tau, confidence threshold"),
        ("lambda_u", float, "unlabelled loss weight"), ("ema_decay", float, "EMA decay"),
        ("depth", int, "WideResNet depth"), ("widen_factor", int, "WideResNet width"),
        ("eval_subset", int, "0: whole test set; n: fixed class-balanced subset"),
        ("eval_batch_size", int, "evaluation batch size"), ("checkpoint_every", int, "steps between checkpoints"),
        ("log_every", int, "steps between training-statistics lines"),
    ]:
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=hint)
    g.add_argument("--precision", choices=list(PRECISIONS), default=None, help="fp32 or bf16 autocast")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov momentum")
    g.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
