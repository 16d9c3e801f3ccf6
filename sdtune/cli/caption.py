"""`sdtune caption DIR`: write a caption sidecar for every image that has none, with a model."""

from __future__ import annotations

import argparse

from sdtune.data.autocaption import DEFAULT_CAPTION_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder of training images")
    parser.add_argument(
        "--model",
        default=DEFAULT_CAPTION_MODEL,
        help=f"image-to-text model: hub id or local folder (default {DEFAULT_CAPTION_MODEL})",
    )
    parser.add_argument("--ext", default=".txt", help="caption file extension (default .txt)")
    parser.add_argument(
        "--prefix", default="", help='put in front of every caption, e.g. the trigger: "sks, "'
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing captions (kept by default)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=30, help="longest caption in tokens (default 30)"
    )
    parser.add_argument(
        "--no-recursive", dest="recursive", action="store_false", help="skip subfolders"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    from sdtune.data.autocaption import caption_folder

    report = caption_folder(
        args.dir,
        model=args.model,
        caption_ext=args.ext,
        prefix=args.prefix,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        recursive=args.recursive,
        device=args.device,
    )
    print(report.summary())
    return 0
