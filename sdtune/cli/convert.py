"""`sdtune convert FILE --to kohya|diffusers --out OUT`: rewrite an adapter for other tools."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an adapter file or run folder, in any layout")
    parser.add_argument(
        "--to", required=True, choices=["kohya", "diffusers"], help="layout to write"
    )
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--family", default=None, help="base model family; read from the file if unset"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the base model the adapter is for (folder, checkpoint or hub id), when it is not a "
        "full-size model of its family; names and shapes are checked against it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def check_arguments(args: argparse.Namespace) -> None:
    """The file, the output and the family name, checked before torch is imported."""
    from sdtune.errors import SdtuneError
    from sdtune.models.families import get_family

    if not Path(args.file).exists():
        raise SdtuneError(f"adapter '{args.file}' does not exist")
    if Path(args.out).exists() and not args.overwrite:
        raise SdtuneError(f"'{args.out}' already exists; pass --overwrite to replace it")
    if args.family is not None:
        get_family(args.family)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from sdtune.adapters.export import export_diffusers, export_kohya

    base = None
    if args.model:
        from sdtune.models.loading import load_pipeline

        base = load_pipeline(args.model, args.family)
    export = export_kohya if args.to == "kohya" else export_diffusers
    print(export(args.file, args.out, args.family, overwrite=args.overwrite, base=base))
    return 0
