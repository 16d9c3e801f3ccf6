"""Checking training options as a form does: every problem at once, by key, with the messages
`sdtune train` prints; validation by section, so commands that read no images need no data.dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdtune.cli.main import main
from sdtune.config import load_config, read_config
from sdtune.config_checks import validate_config
from sdtune.config_form import check_config_values, config_form
from sdtune.errors import SdtuneError

REQUIRED = {"model.path": "m", "data.dir": "d"}

# One problem each, of every kind: unknown key, wrong type, choices, declared range, a rule
# interval notation cannot say, a consistency check, a caption check, a LoRA target spec.
SINGLE = {
    "lora.rnak": "4",
    "lora.rank": "four",
    "train.optimizer": "adam",
    "train.learning_rate": "-1",
    "data.resolution": "500",
    "data.class_dir": "classes",
    "data.caption_ext": ".png",
    "lora.unet_targets": "re:(",
    "output.sample_seed": "-1",
}


def test_several_problems_are_all_reported():
    problems = check_config_values(None, {**REQUIRED, **SINGLE})
    assert set(problems) == {*SINGLE, "data.class_prompt"} - {"data.class_dir"}
    assert problems["lora.rnak"] == "unknown config key 'lora.rnak'; did you mean 'lora.rank'?"
    assert (
        problems["train.learning_rate"]
        == "train.learning_rate must be positive and finite; got -1.0"
    )
    assert (
        problems["data.resolution"] == "data.resolution must be a positive multiple of 8; got 500"
    )
    assert all("\n" not in message for message in problems.values())


def test_a_fine_set_has_no_problems():
    fine = {**REQUIRED, "lora.rank": "8", "train.optimizer": "adafactor", "data.resolution": "768"}
    assert (
        check_config_values(None, {**fine, "data.class_dir": "c", "data.class_prompt": "a dog"})
        == {}
    )


@pytest.mark.parametrize("key", sorted(SINGLE))
def test_the_message_is_what_sdtune_train_prints(key, capsys, tmp_path):
    items = {**REQUIRED, "output.dir": str(tmp_path / "run"), key: SINGLE[key]}
    problems = check_config_values(None, items)
    assert len(problems) == 1
    assert main(["train", *(f"{k}={v}" for k, v in items.items())]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed == f"sdtune train: error: {next(iter(problems.values()))}"
    assert not (tmp_path / "run").exists()


def test_a_recipe_is_checked_with_its_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: m\ndata:\n  dir: d\n  reslution: 512\nlora:\n  rank: 0\n")
    problems = check_config_values(str(recipe), {"train.max_steps": "many"})
    assert set(problems) == {"data.reslution", "lora.rank", "train.max_steps"}
    assert "did you mean 'data.resolution'" in problems["data.reslution"]
    recipe.write_text("model: [unclosed\n")
    assert set(check_config_values(str(recipe), {})) == {"recipe"}


def test_required_keys_and_checks_apply_by_section():
    assert set(check_config_values(None, {})) == {"model.path", "data.dir"}
    assert set(check_config_values(None, {}, sections=("data",))) == {"data.dir"}
    data_only = {"data.dir": "d", "lora.rank": "0"}
    assert check_config_values(None, data_only, sections=("data",)) == {}
    assert set(check_config_values(None, data_only)) == {"model.path", "lora.rank"}
    cfg = read_config(None, {"data.dir": "d", "data.resolution": "7", "lora.rank": "0"})
    with pytest.raises(SdtuneError, match="data.resolution must be a positive multiple of 8"):
        validate_config(cfg, sections=("data",))
    validate_config(cfg, sections=("train", "output"))  # neither section has a problem
    with pytest.raises(SdtuneError, match="model.path is required"):
        validate_config(cfg, sections=("model", "train"))
    validate_config(cfg, sections=("model", "train"), required=())
    with pytest.raises(SdtuneError, match="model.path is required"):  # named: needed anyway
        validate_config(cfg, sections=("train",), required=("model.path",))
    with pytest.raises(SdtuneError, match="unknown config section 'modle'"):
        load_config(None, REQUIRED, sections=("modle",))


def test_the_form_lists_every_option_as_json():
    form = json.loads(json.dumps(config_form()))
    entry = {e["key"]: e for e in form}
    assert entry["train.learning_rate"] == {
        "key": "train.learning_rate", "section": "train", "type": "float", "default": 1e-4,
        "help": "learning rate of the U-Net LoRA", "choices": None, "valid": "(0, inf)",
        "nullable": False,
    }  # fmt: skip
    assert entry["train.optimizer"]["choices"][0] == "adamw"
    assert entry["data.sources"]["type"] == "list" and entry["data.sources"]["default"] == []
    assert entry["output.sample_prompts"]["type"] == "list[str]"
    assert (
        entry["lora.text_encoder_rank"]["type"] == "int"
        and entry["lora.text_encoder_rank"]["nullable"]
    )
    assert {e["section"] for e in form} == {"model", "data", "lora", "train", "output"}


def test_checking_values_imports_no_heavy_library_and_writes_nothing(tmp_path):
    code = (
        "import sys; from sdtune.config_form import check_config_values as c, config_form as f; "
        "c(None, {'lora.rank': '0', 'lora.unet_targets': 're:('}); f(); "
        "print([m for m in ('torch', 'diffusers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]", out.stderr
    assert list(tmp_path.iterdir()) == []


def test_estimate_checks_the_data_options_without_needing_data_dir(capsys):
    # Its run with model.family alone is tests/train/test_estimate.py's README line, and
    # `sdtune data inspect` without model.path is tests/data/test_report.py.
    assert main(["estimate", "data.resolution=7", "model.family=sd1"]) == 2
    assert "data.resolution must be a positive multiple of 8" in capsys.readouterr().err
    assert main(["estimate"]) == 2  # neither a family nor a model to read it from
    assert "model.path is required" in capsys.readouterr().err
