"""Every shipped recipe is a valid config whose first line is the command that runs it."""

import shlex
from pathlib import Path

import pytest

from sdtune.config import load_config

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_strictly_with_the_overrides_of_its_first_line(recipe):
    first = recipe.read_text(encoding="utf-8").splitlines()[0]
    words = shlex.split(first.removeprefix("#"))
    assert words[:3] == ["sdtune", "train", f"recipes/{recipe.name}"]
    cfg = load_config(recipe, dict(item.split("=", 1) for item in words[3:]))
    assert cfg.model.path and (cfg.data.dir or cfg.data.sources or cfg.data.dataset)
    assert cfg.train.mixed_precision in ("auto", "bf16")  # fp16 alone would fail on a CPU


def test_the_recipes_folder_holds_the_family_recipes():
    names = {p.stem for p in RECIPES}
    assert {"sd15-lora", "sd2-768v-lora", "dreambooth-lora", "inpainting-lora"} <= names
