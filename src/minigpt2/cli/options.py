"""Options that several commands share, each written once: how a command runs on the CPU."""

from __future__ import annotations

import argparse
import os

from ..device import set_threads


def add_cpu_options(p: argparse.ArgumentParser) -> None:
    """--threads and --no-native, for the commands that run a model (sample, eval)."""
    p.add_argument(
        "--no-native",
        action="store_true",
        help="decode in PyTorch only, never in the native decoder (as MINIGPT2_NATIVE=0 does)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: one per core idle at the start)",
    )


def apply_cpu_options(args: argparse.Namespace) -> None:
    """Set what add_cpu_options' options ask, before any model is loaded."""
    set_threads(args.threads)
    if args.no_native:  # the switch the native decoder reads, for this whole process
        os.environ["MINIGPT2_NATIVE"] = "0"
