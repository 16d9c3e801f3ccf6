"""`sdtune check FILE [--family F | --model M]`: how many modules of an adapter diffusers,
AUTOMATIC1111 and ComfyUI/Forge would load, and the names of those they would not."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an adapter .safetensors file, or a run folder")
    parser.add_argument(
        "--family", default=None, help="base model family (sd1, sd2-base, ...); read from the file"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="check against this model (folder, checkpoint or hub id) instead of a full-size "
        "model of the family",
    )


def run(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when a consumer the file is meant for would not load it whole."""
    from sdtune.adapters.check import check_adapter

    base = None
    if args.model:
        from sdtune.models.loading import load_pipeline

        base = load_pipeline(args.model, args.family)
    report = check_adapter(args.file, args.family, base)
    print(report.format_table())
    return 0 if report.ok else 1
