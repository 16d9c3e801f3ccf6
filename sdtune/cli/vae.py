"""`sdtune vae encode|decode|roundtrip`: a model's VAE on your own images."""

from __future__ import annotations

import argparse
from pathlib import Path

PARSER_KWARGS = {"description": "Encode images to latents, decode them, measure the round trip."}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vae_command", metavar="ACTION", required=True)
    encode = sub.add_parser("encode", help="image -> latents file (posterior mean and variance)")
    encode.add_argument("image")
    encode.add_argument("--out", required=True, help="new .safetensors file for the latents")
    decode = sub.add_parser("decode", help="latents file -> PNG")
    decode.add_argument("latents")
    decode.add_argument("--out", required=True, help="folder for the PNG")
    trip = sub.add_parser("roundtrip", help="encode and decode; report compression and error")
    trip.add_argument("image")
    trip.add_argument("--out", default=None, help="folder for the reconstructed PNG")
    for action in (encode, decode, trip):
        action.add_argument("--model", required=True, help="base model (folder, file, hub id)")
        action.add_argument("--family", default=None, help="model family, if detection needs help")


def run(args: argparse.Namespace) -> int:
    from sdtune.cli.main import quiet_progress_bars
    from sdtune.generate import vae as tools
    from sdtune.models.loading import load_pipeline

    quiet_progress_bars()
    vae = load_pipeline(args.model, family=args.family).vae
    if args.vae_command == "encode":
        encoding = tools.encode_image(vae, args.image)
        print(tools.save_latents(encoding, args.out))
        print("latents", "x".join(str(n) for n in encoding.mean.shape[1:]))
    elif args.vae_command == "decode":
        image = tools.decode_to_image(vae, tools.load_latents(args.latents).latents())
        what = f"decoded {Path(args.latents).name}"
        print(_save_png(image, args, what, "vae decode", Path(args.latents).stem))
    else:
        report, image = tools.reconstruction_report(vae, args.image)
        print(report.format_table())
        if args.out:
            what = f"VAE round trip of {Path(args.image).name}"
            stem = f"{Path(args.image).stem}-roundtrip"
            print(_save_png(image, args, what, "vae roundtrip", stem))
    return 0


def _save_png(image, args: argparse.Namespace, what: str, mode: str, stem: str) -> Path:
    """`image` as a PNG in `args.out` whose parameters say what it is (never overwriting)."""
    from sdtune.generate.outputs import GenerationParams, save_png

    params = GenerationParams(
        prompt=what, width=image.width, height=image.height, model=args.model, mode=mode
    )
    return save_png(image, args.out, params, stem=stem)
