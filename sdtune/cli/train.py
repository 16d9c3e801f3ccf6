"""`sdtune train [RECIPE.yaml] [section.key=value ...]`"""

from __future__ import annotations

import argparse
import logging

from sdtune.config import load_config, split_command_items
from sdtune.config_form import format_options

PARSER_KWARGS = {
    "formatter_class": argparse.RawDescriptionHelpFormatter,
    "description": "Train a LoRA. Options come from a recipe file, then key=value overrides.",
    "epilog": "options (section.key=value):\n" + format_options(),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "items",
        nargs="*",
        metavar="RECIPE|KEY=VALUE",
        help="a recipe file (.yaml) followed by overrides such as lora.rank=8",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_config(*split_command_items(args.items))

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.train.loop import train

    quiet_progress_bars()

    result = train(cfg)
    if result.stopped is None:
        logging.getLogger("sdtune.train").info("adapter: %s", result.adapter_path)
    return 0
