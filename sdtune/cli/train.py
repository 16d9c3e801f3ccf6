"""`sdtune train [RECIPE.yaml] [section.key=value ...]`"""

from __future__ import annotations

import argparse
import logging

from sdtune.config import format_options, load_config, parse_overrides

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
    recipe = None
    items = list(args.items)
    if items and "=" not in items[0]:
        recipe = items.pop(0)
    cfg = load_config(recipe, parse_overrides(items))

    from sdtune.cli.main import quiet_progress_bars
    from sdtune.train.loop import train

    quiet_progress_bars()

    result = train(cfg)
    logging.getLogger("sdtune.train").info("adapter: %s", result.adapter_path)
    return 0
