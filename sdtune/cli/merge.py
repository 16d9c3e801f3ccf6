"""`sdtune merge`: fuse adapters into a base model, or merge several adapters into one.

With `--base`, the weighted adapters are added into the base weights and the model is saved as
a diffusers folder (`--out-dir`) and/or one original-layout `.safetensors` (`--checkpoint`).
Without `--base`, the adapters become one adapter (`--out`): ranks concatenated, or re-factored
to `--rank` by SVD.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        required=True,
        metavar="FILE[:WEIGHT]",
        help="an adapter with an optional weight (repeatable)",
    )
    parser.add_argument(
        "--base", default=None, help="base model to fuse into (folder, file, hub id)"
    )
    parser.add_argument(
        "--out-dir", default=None, help="write the fused model as a diffusers folder"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="write the fused model as one .safetensors"
    )
    parser.add_argument("--out", default=None, help="write the merged adapter here (no --base)")
    parser.add_argument("--rank", type=int, default=None, help="SVD rank of the merged adapter")
    parser.add_argument("--to", default="diffusers", choices=["diffusers", "kohya"], help="layout")
    parser.add_argument("--family", default=None, help="base model family, if detection needs help")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


def run(args: argparse.Namespace) -> int:
    from sdtune.errors import SdtuneError
    from sdtune.generate.schema import parse_lora

    adapters = [parse_lora(spec) for spec in args.lora]
    if args.base is not None:
        if not (args.out_dir or args.checkpoint):
            raise SdtuneError("with --base, pass --out-dir and/or --checkpoint for the fused model")
        return _fuse(args, adapters)
    if not args.out:
        raise SdtuneError("pass --out for the merged adapter, or --base to fuse into a model")
    from sdtune.adapters.export import read_for_family, same_base, write_layers
    from sdtune.adapters.merge import merge_adapters, summarize

    read = [read_for_family(path, args.family) for path, _ in adapters]
    family = read[0][1]
    for (path, _), (_, fam, _) in zip(adapters[1:], read[1:], strict=True):
        if not same_base(fam.name, family.name):
            raise SdtuneError(
                f"cannot merge '{adapters[0][0]}' ({family.name}) with '{path}' ({fam.name}): "
                "adapters of different model families; merge adapters of one family"
            )
    layers, reports = merge_adapters(
        [(a, w) for (a, _, _), (_, w) in zip(read, adapters, strict=True)], args.rank
    )
    info = {"merged_from": ", ".join(f"{p}:{w:g}" for p, w in adapters)}
    print(write_layers(layers, args.out, family.name, args.to, info, args.overwrite))
    if reports:
        print(summarize(reports))
    return 0


def _fuse(args: argparse.Namespace, adapters: list[tuple[str, float]]) -> int:
    from sdtune.adapters.merge import fuse_adapters, save_merged_model
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.models.loading import load_pipeline

    quiet_progress_bars()
    pipe = load_pipeline(args.base, family=args.family)
    fuse_adapters(pipe, adapters)
    for path in save_merged_model(pipe, args.out_dir, args.checkpoint, args.overwrite):
        print(path)
    return 0
