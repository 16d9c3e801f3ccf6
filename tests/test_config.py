import pytest

from sdtune.config import iter_options, load_config, parse_overrides, save_config
from sdtune.config_form import format_options
from sdtune.errors import SdtuneError

REQUIRED = {"model.path": "m", "data.dir": "d"}


def test_defaults_and_overrides_are_typed():
    cfg = load_config(
        None,
        {
            **REQUIRED,
            "train.learning_rate": "1e-3",
            "lora.rank": "8",
            "lora.train_text_encoder": "yes",
            "train.prediction_type": "null",
        },
    )
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.lora.rank == 8 and cfg.lora.train_text_encoder is True
    assert cfg.train.prediction_type is None
    assert cfg.lora.alpha == 16.0  # untouched default


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(SdtuneError, match=r"unknown config key 'lora\.rnak'.*'lora\.rank'"):
        load_config(None, {**REQUIRED, "lora.rnak": "4"})
    with pytest.raises(
        SdtuneError, match=r"unknown config key 'trian\.max_steps'.*'train\.max_steps'"
    ):
        load_config(None, {**REQUIRED, "trian.max_steps": "4"})


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("lora.rank", "four", r"lora\.rank must be int"),
        ("lora.rank", "2.5", r"lora\.rank must be int"),
        ("train.learning_rate", "fast", r"train\.learning_rate must be float"),
        ("data.center_crop", "maybe", r"data\.center_crop must be bool"),
        (
            "train.mixed_precision",
            "fp8",
            r"train\.mixed_precision must be one of auto, no, fp16, bf16",
        ),
        ("lora.rank", "0", r"lora\.rank must be at least 1"),
        ("train.learning_rate", "-1", r"train\.learning_rate must be positive"),
        ("data.resolution", "500", r"data\.resolution must be a positive multiple of 8"),
        ("model.path", "", r"model\.path is required"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(SdtuneError, match=message):
        load_config(None, {**REQUIRED, key: value})


def test_recipe_file_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  path: base\ndata:\n  dir: imgs\nlora:\n  rank: 4\n  alpha: 2\n")
    cfg = load_config(recipe, parse_overrides(["lora.rank=32"]))
    assert (cfg.model.path, cfg.data.dir, cfg.lora.rank, cfg.lora.alpha) == (
        "base",
        "imgs",
        32,
        2.0,
    )


def test_recipe_with_unknown_key_or_bad_yaml(tmp_path):
    bad_key = tmp_path / "k.yaml"
    bad_key.write_text("model:\n  path: base\n  familly: sd1\n")
    with pytest.raises(SdtuneError, match=r"'model\.familly'.*'model\.family'"):
        load_config(bad_key)
    bad_yaml = tmp_path / "y.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    with pytest.raises(SdtuneError, match="not valid YAML"):
        load_config(bad_yaml)
    with pytest.raises(SdtuneError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax_is_checked():
    with pytest.raises(SdtuneError, match="section.key=value"):
        parse_overrides(["lora.rank"])


def test_saved_config_loads_back_equal(tmp_path):
    cfg = load_config(
        None, {**REQUIRED, "lora.rank": "4", "train.text_encoder_learning_rate": "5e-5"}
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_help_lists_every_option():
    text = format_options()
    for key, field, _ in iter_options():
        assert key in text and field.metadata["help"] in text
