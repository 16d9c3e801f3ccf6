"""Input a hostile or unlucky user gives: YAML alias bombs, huge values, template fields that
reach into objects, a caption extension that is an image's, NaN weights and guidance, empty
seeds, and adapters of one family relabelled or merged with another's. Each is one line, exit 2."""

import pytest

from sdtune.cli.main import MESSAGE_LIMIT, main
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.tiny import build_tiny_pipeline
from tests.adapters.test_export_and_load import trained_adapter

BASE = {"model.path": "m", "data.dir": "d"}


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[:2000]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        levels.append(f"{chr(97 + i)}: &{chr(97 + i)} [{','.join(['*' + chr(96 + i)] * 9)}]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("model:\n  path: m\ndata:\n  dir: d\n  " + "\n  ".join(levels) + "\n")
    assert len(recipe.read_bytes()) < 600
    line = _one_line_error(capsys, ["train", str(recipe)], "aliases", "not allowed")
    assert len(line) < 300
    with pytest.raises(SdtuneError, match="aliases"):  # on the command line too
        load_config(None, {**BASE, "data.sources": "[{dir: &x a}, {dir: *x}]"})


def test_every_quoted_value_is_cut_to_a_readable_length(capsys):
    huge = "x" * 200_000
    for item in (f"lora.rank={huge}", f"data.sources={huge}", f"train.optimizer={huge}"):
        line = _one_line_error(capsys, ["train", "model.path=m", "data.dir=d", item])
        assert len(line) <= MESSAGE_LIMIT + 40 and "characters" in line
    with pytest.raises(SdtuneError) as info:
        load_config(None, {**BASE, "lora.alpha": huge})
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("template", ["{name.nope}", "{trigger.__class__}", "{0}", "{name!r}"])
def test_caption_templates_take_only_the_documented_fields(template):
    with pytest.raises(SdtuneError, match=r"only \{trigger\} and \{name\} are filled in"):
        load_config(None, {**BASE, "data.caption_template": template})


def test_documented_caption_templates_still_load():
    for template in ("a photo of {trigger}", "{name}, {trigger}", "{{literal}} {name:.10}"):
        assert load_config(None, {**BASE, "data.caption_template": template})


def test_a_caption_extension_that_is_an_image_extension_is_refused():
    with pytest.raises(SdtuneError, match="data.caption_ext is '.png', an image extension"):
        load_config(None, {**BASE, "data.caption_ext": ".png"})
    sources = "[{dir: a, caption_ext: .JPG}]"
    with pytest.raises(SdtuneError, match=r"data.sources\[0\].caption_ext is '.JPG'"):
        load_config(None, {"model.path": "m", "data.sources": sources})
    assert load_config(None, {**BASE, "data.caption_ext": ".caption"})


def test_generate_refuses_nan_weights_nan_guidance_and_empty_seeds(tmp_path, capsys):
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    base = ["generate", "--prompt", "x", "--model", str(tmp_path)]
    _one_line_error(capsys, [*base, "--lora", f"{adapter}:nan"], "finite number")
    _one_line_error(capsys, [*base, "--lora", f"{adapter}:-inf"], "finite number")
    _one_line_error(capsys, [*base, "--guidance", "nan"], "--guidance", "finite")
    _one_line_error(capsys, [*base, "--seeds", "1,,2"], "--seeds", "'1,,2'")
    _one_line_error(capsys, [*base, "--seeds", "1,2,"], "--seeds")
    _one_line_error(capsys, [*base, "--snapshots", "0.5,nan"], "--snapshots")


@pytest.fixture(scope="module")
def sd1_and_sd2(tmp_path_factory):
    attn = {"lora.unet_targets": "attn"}  # modules the full-size models have too
    sd1, _ = trained_adapter(tmp_path_factory.mktemp("sd1"), family="sd1", **attn)
    sd2, _ = trained_adapter(tmp_path_factory.mktemp("sd2"), family="sd2-base", **attn)
    return sd1, sd2


def test_merging_adapters_of_two_families_names_both(sd1_and_sd2, tmp_path, capsys):
    sd1, sd2 = sd1_and_sd2
    out = tmp_path / "m.safetensors"
    argv = ["merge", "--lora", str(sd1), "--lora", str(sd2), "--out", str(out)]
    _one_line_error(capsys, argv, "(sd1)", "(sd2-base)", "different model families")
    assert not out.exists()


def test_convert_refuses_a_family_the_file_contradicts(sd1_and_sd2, tmp_path, capsys):
    _, sd2 = sd1_and_sd2
    out = tmp_path / "k.safetensors"
    argv = ["convert", str(sd2), "--to", "kohya", "--out", str(out), "--family", "sd1"]
    _one_line_error(capsys, argv, "sd2-base adapter", "--family is sd1")
    assert not out.exists()
    base = tmp_path / "tiny-sd2"  # the tiny model the adapter is for
    build_tiny_pipeline("sd2-base").save_pretrained(base)
    assert (
        main(["convert", str(sd2), "--to", "kohya", "--out", str(out), "--model", str(base)]) == 0
    )
