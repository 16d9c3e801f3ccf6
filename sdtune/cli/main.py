"""The `sdtune` command. Each subcommand lives in its own module and imports heavy libraries
only when it runs, so `sdtune --help` answers at once."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from sdtune import __version__
from sdtune.errors import SdtuneError
from sdtune.stack import check_stack

# subcommand -> (module under sdtune.cli, one line of help)
SUBCOMMANDS = {
    "train": ("train", "train a LoRA from a recipe and key=value overrides"),
    "generate": ("generate", "generate images with a base model and LoRA adapters"),
    "data": ("data", "dry run of the data: buckets, skipped files, caption statistics"),
    "inspect": ("inspect", "show what an adapter file holds: format, family, ranks, metadata"),
    "check": ("check", "how many modules diffusers, AUTOMATIC1111 and ComfyUI would load"),
    "convert": ("convert", "rewrite an adapter as kohya/A1111/ComfyUI or diffusers, checked"),
    "merge": ("merge", "fuse adapters into a base model, or merge adapters into one"),
    "resize": ("resize", "change an adapter's rank by SVD and report what it keeps"),
    "extract": ("extract", "extract a LoRA from a fine-tuned model and its base"),
    "push": ("push", "upload a run folder (adapter + model card) to the Hugging Face Hub"),
    "vae": ("vae", "encode/decode images with a model's VAE; report compression and error"),
    "info": ("info", "parameter counts of a model per component and layer type"),
    "estimate": ("estimate", "predicted peak GPU memory of a training run, before loading it"),
    "caption": ("caption", "caption images with an image-to-text model (BLIP); writes sidecars"),
    "demo": ("demo", "teach the shipped toy model a new concept with a LoRA, end to end"),
    "eval": ("eval", "concept rate and retention of the toy model, with or without a LoRA"),
    "ui": ("ui", "the local web app: datasets, runs with live progress, results, generation"),
}


MESSAGE_LIMIT = 500  # characters of an error line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdtune", description="LoRA fine-tuning for Stable Diffusion 1.x, 2.x and SDXL."
    )
    parser.add_argument("--version", action="version", version=f"sdtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in SUBCOMMANDS.items():
        mod = importlib.import_module(f"sdtune.cli.{module}")
        mod.add_arguments(sub.add_parser(name, help=help_line, **getattr(mod, "PARSER_KWARGS", {})))
    return parser


def quiet_libraries() -> None:
    """Keep the libraries' advisory warnings and loading bars out of sdtune's own output."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("bitsandbytes", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")


def quiet_progress_bars() -> None:
    """Hide diffusers' model-loading bars (this imports torch, so call it just before loading)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """An error message on one line of at most `limit` characters, however long the value it
    quotes."""
    text = " ".join(message.split())
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text)} characters)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # With several processes (torchrun, accelerate launch) only the first one reports progress.
    main_process = os.environ.get("RANK", "0") == "0"
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout)
    if not args.debug:
        quiet_libraries()
    module = importlib.import_module(f"sdtune.cli.{SUBCOMMANDS[args.command][0]}")
    try:
        check_stack()  # an installed combination that cannot work stops here, in one line
        return module.run(args) or 0
    except SdtuneError as exc:
        if args.debug:
            raise
        print(f"sdtune {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
