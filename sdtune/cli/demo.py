"""`sdtune demo [--out DIR]`: the whole flow on a built-in tiny model and image set."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default="outputs/demo", help="folder for everything the demo makes"
    )
    parser.add_argument("--steps", type=int, default=200, help="training steps")


def run(args: argparse.Namespace) -> int:
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.demo import run_demo

    quiet_progress_bars()

    summary = run_demo(args.out, max_steps=args.steps)
    print(summary)
    return 0
