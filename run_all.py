#!/usr/bin/env python
"""Run our FixMatch and TorchSSL's side by side on CIFAR-10 and write the report: `python run_all.py --help`.
The same command as the installed console script `fixmatch-bench`; everything lives in harness/cli.py."""
import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
