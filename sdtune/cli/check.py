"""`sdtune check FILE [--family F]`: how many modules diffusers, AUTOMATIC1111 and ComfyUI load."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an adapter .safetensors file, or a run folder")
    parser.add_argument(
        "--family", default=None, help="base model family (sd1, sd2-base, ...); read from the file"
    )


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when a consumer the file is meant for would not load it whole."""
    from sdtune.adapters.check import check_adapter

    report = check_adapter(args.file, args.family)
    print(report.format_table())
    return 0 if report.ok else 1
