"""`sdtune extract --base A --tuned B --rank N --out FILE`: a LoRA from a fine-tune's change."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base model (folder, file, hub id)")
    parser.add_argument("--tuned", required=True, help="the fine-tuned model of the same family")
    parser.add_argument("--rank", type=int, required=True, help="rank of every extracted layer")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--to", default="diffusers", choices=["diffusers", "kohya"], help="layout")
    parser.add_argument("--family", default=None, help="model family, if detection needs help")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from sdtune.adapters.export import write_layers
    from sdtune.adapters.io import check_writable
    from sdtune.adapters.merge import extract_lora, summarize
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.errors import SdtuneError
    from sdtune.models.families import detect_family
    from sdtune.models.loading import load_pipeline

    if args.rank < 1:
        raise SdtuneError(f"--rank must be at least 1, got {args.rank}")
    check_writable(args.out, args.overwrite)
    quiet_progress_bars()
    base = load_pipeline(args.base, family=args.family)
    tuned = load_pipeline(args.tuned, family=args.family)
    layers, reports = extract_lora(base, tuned, args.rank)
    info = {"extracted_from": f"{args.tuned} - {args.base}", "rank": str(args.rank)}
    family = detect_family(base).name
    print(write_layers(layers, args.out, family, args.to, info, args.overwrite))
    print(summarize(reports))
    return 0
