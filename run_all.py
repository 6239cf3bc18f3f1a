#!/usr/bin/env python
"""Run our FixMatch and MixMatch beside TorchSSL's and USB's on CIFAR-10 and write the report: `--help` says how.
The same command as the installed console script `fixmatch-bench`; everything lives in harness/cli.py."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
