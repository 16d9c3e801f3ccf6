"""Config fuzzing: random keys, wrong types and out-of-range values always give one SdtuneError
line that names the key, in-process and through the real CLI (exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdtune.config import iter_options, load_config
from sdtune.errors import SdtuneError

REQUIRED = {"model.path": "m", "data.dir": "d"}
OPTIONS = {key: (f, tp) for key, f, tp in iter_options()}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values of every kind YAML or a command line can carry.
any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["none", "null", "~", "nan", "-inf", "1e400", "0x10", " 7 ", "9" * 5000]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _outcome(overrides: dict) -> SdtuneError | None:
    try:
        load_config(None, {**REQUIRED, **overrides})
    except SdtuneError as exc:
        return exc
    return None  # any other exception type fails the test by propagating


def _assert_one_line_naming(exc: SdtuneError, key: str) -> None:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, repr(message)
    assert key in message, (key, message)


@FUZZ
@given(key=st.sampled_from(sorted(OPTIONS)), value=any_value)
def test_any_value_for_a_real_key_is_accepted_or_names_the_key(key, value):
    exc = _outcome({key: value})
    if exc is not None:
        if key == "data.class_dir":  # the rule names both keys: class_prompt is required with it
            assert "data.class_dir" in str(exc)
        _assert_one_line_naming(exc, key)


key_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="="), min_size=1, max_size=40
)


@FUZZ
@given(key=key_text, value=any_value)
def test_unknown_keys_are_one_line_errors_naming_them(key, value):
    if key in OPTIONS:
        return
    exc = _outcome({key: value})
    assert exc is not None and "unknown config key" in str(exc)
    assert "\n" not in str(exc) and "\r" not in str(exc), repr(str(exc))


# Values that must be refused, one per rule the issue names, and others like them.
OUT_OF_RANGE = [
    ("lora.rank", 0),
    ("lora.rank", -4),
    ("lora.alpha", 0),
    ("lora.dropout", 1.0),
    ("train.learning_rate", -1e-4),
    ("train.learning_rate", float("nan")),
    ("train.max_steps", 0),
    ("train.batch_size", 0),
    ("data.resolution", 500),
    ("data.resolution", 4),
    ("data.caption_dropout", 1.5),
    ("train.ema_decay", 1.0),
    ("train.optimizer", "adamw9bit"),
    ("lora.rank", 2.5),
    ("lora.rank", True),
    ("train.learning_rate", "fast"),
    ("data.recursive", "maybe"),
    ("output.sample_prompts", {"a": 1}),
]


@pytest.mark.parametrize("key,value", OUT_OF_RANGE)
def test_out_of_range_and_wrong_type_values_are_refused(key, value):
    exc = _outcome({key: value})
    assert exc is not None, (key, value)
    _assert_one_line_naming(exc, key)


@FUZZ
@given(key=st.sampled_from(sorted(OPTIONS)), value=any_value)
def test_recipe_files_go_through_the_same_checks(tmp_path_factory, key, value):
    section, name = key.split(".")
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    data = {"model": {"path": "m"}, "data": {"dir": "d"}}
    data.setdefault(section, {})[name] = value
    recipe.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_config(recipe)
    except SdtuneError as exc:
        _assert_one_line_naming(exc, key)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_a_recipe_of_random_bytes_is_an_sdtune_error_or_a_config(tmp_path_factory, raw):
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_bytes(raw)
    try:
        load_config(recipe, REQUIRED)
    except SdtuneError as exc:
        assert "\n" not in str(exc)


def _cli(*items: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", "train", *items],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def _assert_cli_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtune"), proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    "override,key",
    [
        ("lora.rank=0", "lora.rank"),
        ("train.learning_rate=-0.001", "train.learning_rate"),
        ("data.resolution=100", "data.resolution"),
        ("lora.rnak=4", "lora.rnak"),
        ("train.max_steps=ten", "train.max_steps"),
        ("data.recursive=perhaps", "data.recursive"),
    ],
)
def test_cli_bad_overrides_exit_2_with_one_line(override, key):
    _assert_cli_one_line(_cli("model.path=m", "data.dir=d", override), key)


def test_cli_recipe_that_is_not_utf8_or_not_a_mapping(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  path: caf\xe9\n")
    _assert_cli_one_line(_cli(str(tmp_path / "latin1.yaml")), "latin1.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n", encoding="utf-8")
    _assert_cli_one_line(_cli(str(tmp_path / "list.yaml")), "list.yaml")


def test_batch_larger_than_the_dataset_is_refused_before_loading(star_images, tmp_path):
    from sdtune.train.setup import check_inputs

    cfg = load_config(
        None,
        {
            "model.path": "not-loaded",
            "data.dir": str(star_images),
            "train.batch_size": 9,
            "output.dir": str(tmp_path / "out"),
        },
    )
    with pytest.raises(SdtuneError) as info:
        check_inputs(cfg)
    _assert_one_line_naming(info.value, "train.batch_size")
    assert not (tmp_path / "out").exists()


def test_string_options_accept_the_word_none():
    """`none` is a value of output.log_with; only optional options read it as null."""
    cfg = load_config(None, {**REQUIRED, "output.log_with": "none"})
    assert cfg.output.log_with == "none"
    assert load_config(None, {**REQUIRED, "lora.text_encoder_rank": "none"}) is not None
    assert typing.get_type_hints(type(cfg.output))["log_with"] is str


def _is_float_option(tp) -> bool:
    return tp is float or float in typing.get_args(tp)


FLOAT_OPTIONS = sorted(key for key, (_, tp) in OPTIONS.items() if _is_float_option(tp))


def test_every_float_option_declares_its_range_once():
    import dataclasses

    from sdtune.config import SourceConfig

    hints = typing.get_type_hints(SourceConfig)
    source_floats = [f for f in dataclasses.fields(SourceConfig) if _is_float_option(hints[f.name])]
    undeclared = [key for key in FLOAT_OPTIONS if OPTIONS[key][0].metadata.get("valid") is None]
    undeclared += [
        f"data.sources[].{f.name}" for f in source_floats if f.metadata.get("valid") is None
    ]
    assert FLOAT_OPTIONS and not undeclared


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "-1e400"])
@pytest.mark.parametrize("key", FLOAT_OPTIONS)
def test_every_float_option_refuses_nan_and_infinities(key, value):
    exc = _outcome({key: value})
    assert exc is not None, (key, value)
    _assert_one_line_naming(exc, key)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.5", "-0.1"])
def test_float_ranges_hold_inside_data_sources(value):
    exc = _outcome({"data.dir": "", "data.sources": f"[{{dir: a, tag_dropout: {value}}}]"})
    assert exc is not None
    _assert_one_line_naming(exc, "data.sources[0].tag_dropout")


DEEP = "[" * 3000 + "]" * 3000


def _cli_command(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdtune.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["train", "model.path=m", "data.dir=d", f"data.sources={DEEP}"], "too deeply"),
        (["data", "inspect", "model.path=m", "data.dir=d", f"data.sources={DEEP}"], "too deeply"),
        (["train", "model.path=m", "data.dir=d", "train.seed=-1"], "train.seed"),
        (["train", "model.path=m", "data.dir=d", "train.seed=4294967296"], "train.seed"),
        (["train", "model.path=m", "data.dir=d", "output.sample_seed=-3"], "output.sample_seed"),
        (["train", "model.path=m", "data.dir=d", "train.learning_rate=inf"], "learning_rate"),
        (["train", "model.path=m", "data.dir=d", "lora.alpha=nan"], "lora.alpha"),
        (["train", "model.path=m", "data.dir=d", "train.noise_offset=inf"], "noise_offset"),
        (["train", "model.path=m", "data.dir=d", "lora.unet_targets="], "lora.unet_targets"),
        (["train", "model.path=m", "data.dir=d", "lora.unet_targets=re:["], "regular expression"),
        (["train", "model.path=m", "data.dir=d", "lora.unet_targets=re:"], "lora.unet_targets"),
        (
            [
                "train",
                "model.path=m",
                "data.dir=d",
                "lora.train_text_encoder=true",
                "lora.text_encoder_targets=re:((",
            ],
            "lora.text_encoder_targets",
        ),
    ],  # fmt: skip
)
def test_cli_bad_items_exit_2_with_one_line_before_loading(argv, fragment):
    _assert_cli_one_line(_cli_command(*argv), fragment)


@pytest.mark.parametrize("command", [["train"], ["data", "inspect"]])
def test_cli_recipes_too_deep_or_with_huge_integers_are_one_line(tmp_path, command):
    (tmp_path / "huge.yaml").write_text(f"train:\n  seed: {'9' * 5000}\n", encoding="utf-8")
    _assert_cli_one_line(_cli_command(*command, str(tmp_path / "huge.yaml")), "huge.yaml")
    (tmp_path / "deep.yaml").write_text(f"data:\n  sources: {DEEP}\n", encoding="utf-8")
    _assert_cli_one_line(_cli_command(*command, str(tmp_path / "deep.yaml")), "deep.yaml")


def test_cli_lora_target_no_module_has_is_one_line_naming_real_ones(
    tiny_sd1_dir, star_images, tmp_path
):
    proc = _cli_command(
        "train", f"model.path={tiny_sd1_dir}", f"data.dir={star_images}", "data.resolution=32",
        f"output.dir={tmp_path / 'out'}", "output.log_with=none", "lora.unet_targets=to_q,nope",
    )  # fmt: skip
    _assert_cli_one_line(proc, "LoRA target nope;", "module names such as", "to_q", "more)")
    assert not (tmp_path / "out").exists()  # nothing left that would block the retry


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_before_the_run_folder(
    tiny_sd1_dir, star_images, tmp_path
):
    proc = _cli_command(
        "train", f"model.path={tiny_sd1_dir}", f"data.dir={star_images}", "data.resolution=32",
        f"output.dir={tmp_path / 'out'}", "train.zero_terminal_snr=true",
    )  # fmt: skip
    _assert_cli_one_line(proc, "train.zero_terminal_snr=true needs v-prediction")
    assert not (tmp_path / "out").exists()
