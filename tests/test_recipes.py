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
    assert {
        "sd15-lora",
        "sd2-768v-lora",
        "dreambooth-lora",
        "inpainting-lora",
        "sdxl-lora",
        "sdxl-dreambooth-lora",
    } <= names


# The family each recipe's base model belongs to, for a tiny model in its place.
FAMILY_OF_BASE = {
    "runwayml/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-inpainting": "sd1-inpaint",
    "stabilityai/stable-diffusion-2": "sd2-v",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}
# Only what makes the run short: size, steps, counts. Precision, targets, ranks, schedules,
# text-encoder training, checkpoints and samples stay as the recipe sets them.
SHORT = {
    "data.resolution": "32",
    "data.repeats": "1",
    "train.max_steps": "2",
    "output.sample_steps": "2",
    "output.log_with": "none",
}


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    from sdtune.models.tiny import build_tiny_pipeline

    folders = {}
    for family in sorted(set(FAMILY_OF_BASE.values())):
        folders[family] = tmp_path_factory.mktemp(family)
        build_tiny_pipeline(family, seed=0).save_pretrained(folders[family])
    return folders


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_command_trains_a_tiny_model_of_its_family(
    recipe, tiny_bases, star_images, tmp_path, monkeypatch
):
    """The recipe's own first line, run, with a tiny model of the recipe's family and a few
    steps. A recipe's `auto` precision runs as bf16, what it means on a current GPU."""
    import torch
    from safetensors.torch import load_file

    from sdtune.cli.main import main
    from sdtune.train import prior

    words = shlex.split(recipe.read_text(encoding="utf-8").splitlines()[0].removeprefix("#"))
    header = dict(item.split("=", 1) for item in words[3:])
    cfg = load_config(recipe, header)
    family = FAMILY_OF_BASE[cfg.model.path]
    header["model.path"] = str(tiny_bases[family])
    header["data.dir"] = str(star_images)
    if "data.class_dir" in header:
        header["data.class_dir"] = str(tmp_path / "class")
        header["data.num_class_images"] = "1"
        monkeypatch.setattr(prior, "CLASS_IMAGE_STEPS", 2)
    precision = "bf16" if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision
    items = {**header, **SHORT, "output.dir": str(tmp_path / "run")}
    if cfg.train.checkpoint_every_n_steps:  # the recipe checkpoints and samples: at step 1
        items["train.checkpoint_every_n_steps"] = "1"
    if cfg.output.sample_every_n_steps:
        items["output.sample_every_n_steps"] = "1"
    items["train.mixed_precision"] = precision
    if cfg.data.bucketing:  # buckets of about 32² pixels need a finer step than 64
        items["data.bucket_step"] = "16"
    monkeypatch.chdir(recipe.parents[1])  # the header names the recipe relative to the repo
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*words[1:3], *(f"{k}={v}" for k, v in items.items())]) == 0
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    adapter = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    assert (run / "checkpoints").is_dir() == (cfg.train.checkpoint_every_n_steps > 0)
    if cfg.output.sample_prompts:
        assert (run / "samples" / "final-prompt0.png").is_file()
        every = cfg.output.sample_every_n_steps
        assert (run / "samples" / "step000001-prompt0.png").is_file() == (every > 0)
    if cfg.data.class_dir:
        assert (tmp_path / "class" / "class-00000.png").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_sdtune_estimate_knows_each_recipes_family_before_any_download(recipe):
    """`sdtune estimate recipes/X.yaml` needs the family alone; the hub id a recipe names is a
    published base model, whose family sdtune knows without fetching its configs."""
    from sdtune.train.estimate import resolve_family_name

    cfg = load_config(recipe)
    assert resolve_family_name(cfg) == FAMILY_OF_BASE[cfg.model.path]


def test_the_estimate_the_sdxl_recipe_cites_is_what_sdtune_estimate_prints(capsys):
    from sdtune.cli.main import main

    recipe = next(r for r in RECIPES if r.stem == "sdxl-lora")
    assert main(["estimate", str(recipe)]) == 0
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    gib = float(total.split()[1])
    assert gib < 10e9 / 2**30  # the 10 GB target of SDXL at 1024 px, batch 1
    assert f"about {gib:.1f} GiB" in recipe.read_text(encoding="utf-8")
