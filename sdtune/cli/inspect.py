"""`sdtune inspect FILE`: format, family, targets, ranks, alphas, size and metadata of an adapter."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an adapter .safetensors file, or a run folder")


def run(args: argparse.Namespace) -> int:
    from sdtune.adapters.inspect import inspect_adapter

    print(inspect_adapter(args.file).format_table())
    return 0
