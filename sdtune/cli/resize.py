"""`sdtune resize FILE --rank N --out OUT`: change an adapter's rank by SVD, report the loss."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="an adapter file or run folder")
    parser.add_argument("--rank", type=int, required=True, help="the new rank of every layer")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--to", default="diffusers", choices=["diffusers", "kohya"], help="layout")
    parser.add_argument(
        "--family", default=None, help="base model family; read from the file if unset"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from sdtune.adapters.export import read_for_family, write_layers
    from sdtune.adapters.merge import resize_adapter, summarize
    from sdtune.errors import SdtuneError

    if args.rank < 1:
        raise SdtuneError(f"--rank must be at least 1, got {args.rank}")
    adapter, family, _ = read_for_family(args.file, args.family)
    layers, reports = resize_adapter(adapter, args.rank)
    info = {"resized_from": str(adapter.path), "rank": str(args.rank)}
    print(write_layers(layers, args.out, family.name, args.to, info, args.overwrite))
    print(summarize(reports))
    return 0
