"""Automatic captioning with a tiny random BLIP built from config: which files get written,
which are kept, which are reported. A random model's words are gibberish, so only behaviour
is checked."""

from __future__ import annotations

import pytest
from PIL import Image

from sdtune.cli.main import main
from sdtune.data.autocaption import caption_folder as _caption_folder
from sdtune.data.autocaption import with_prefix
from sdtune.errors import SdtuneError


def caption_folder(*args, **kwargs):
    """Short captions keep the tests fast; the behaviour checked does not depend on length."""
    return _caption_folder(*args, max_new_tokens=8, **kwargs)


_WORDS = "a photo of the cat dog on in red blue person table tree sitting grass man woman".split()


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory):
    """A tiny random BLIP captioner (~30k params) saved with its processor, like a hub folder."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {word: i for i, word in enumerate(specials + _WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=32)
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(**tiny, image_size=32, patch_size=8),
        text_config=dict(
            **tiny,
            vocab_size=len(vocab),
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    # A random model may end every caption at once; a real one never does.
    model.generation_config.min_new_tokens = 3
    folder = tmp_path_factory.mktemp("tiny-blip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def image_dir(tmp_path):
    """new.png (no caption), old.jpg (captioned by hand), bad.png (corrupt), sub/deep.png."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (48, 40), (200, 30, 30)).save(folder / "new.png")
    Image.new("RGB", (40, 48), (30, 30, 200)).save(folder / "old.jpg")
    (folder / "old.txt").write_text("my own words\n", encoding="utf-8")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGBA", (32, 32), (0, 200, 0, 128)).save(folder / "sub" / "deep.png")
    return folder


def test_writes_new_keeps_existing_reports_corrupt(tiny_blip_dir, image_dir):
    report = caption_folder(image_dir, model=tiny_blip_dir, prefix="sks, ", batch_size=2)
    written = {path.name for path, _ in report.written}
    assert written == {"new.png", "deep.png"}
    for name in ("new.txt", "sub/deep.txt"):
        text = (image_dir / name).read_text(encoding="utf-8")
        assert text.startswith("sks, ") and len(text.strip()) > len("sks,")
        assert text.endswith("\n") and text.count("\n") == 1
    assert (image_dir / "old.txt").read_text(encoding="utf-8") == "my own words\n"
    assert [p.name for p in report.kept] == ["old.jpg"]
    assert [p.name for p, _ in report.failed] == ["bad.png"]
    assert "cannot decode" in report.failed[0][1]
    assert not (image_dir / "bad.txt").exists()
    assert not [p for p in image_dir.rglob(".*")], "temporary files left behind"


def test_second_run_writes_nothing_and_overwrite_replaces(tiny_blip_dir, image_dir):
    caption_folder(image_dir, model=tiny_blip_dir, prefix="sks, ")
    first = (image_dir / "new.txt").read_text(encoding="utf-8")
    again = caption_folder(image_dir, model=tiny_blip_dir, prefix="other, ")
    assert again.written == []
    assert {p.name for p in again.kept} == {"new.png", "old.jpg", "deep.png"}
    assert (image_dir / "new.txt").read_text(encoding="utf-8") == first

    redone = caption_folder(image_dir, model=tiny_blip_dir, prefix="other, ", overwrite=True)
    assert {p.name for p, _ in redone.written} == {"new.png", "old.jpg", "deep.png"}
    assert redone.kept == []
    for name in ("new.txt", "old.txt", "sub/deep.txt"):
        assert (image_dir / name).read_text(encoding="utf-8").startswith("other, ")


def test_empty_placeholder_is_filled_and_not_recursive(tiny_blip_dir, image_dir):
    (image_dir / "new.txt").write_text("  \n", encoding="utf-8")
    report = caption_folder(image_dir, model=tiny_blip_dir, recursive=False)
    assert {p.name for p, _ in report.written} == {"new.png"}
    assert (image_dir / "new.txt").read_text(encoding="utf-8").strip()
    assert not (image_dir / "sub" / "deep.txt").exists()


def test_done_folder_does_not_load_the_model(image_dir):
    (image_dir / "bad.png").unlink()
    for name in ("new.txt", "sub/deep.txt"):
        (image_dir / name).write_text("done\n", encoding="utf-8")
    report = caption_folder(image_dir, model=image_dir / "no-such-model")
    assert report.written == [] and len(report.kept) == 3


def test_missing_model_path_is_named(tmp_path, image_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SdtuneError, match="no-such-model.*does not exist"):
        caption_folder(image_dir, model=str(missing))


def test_uncached_hub_id_says_how_to_get_it(image_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdtuneError, match="hf download sdtune-test/no-such-captioner"):
        caption_folder(image_dir, model="sdtune-test/no-such-captioner")


def test_bad_device_is_named(tiny_blip_dir, image_dir):
    with pytest.raises(SdtuneError, match="device 'gpu'"):
        caption_folder(image_dir, model=tiny_blip_dir, device="gpu")


def test_with_prefix():
    assert with_prefix("", "a cat") == "a cat"
    assert with_prefix("sks, ", "a cat") == "sks, a cat"
    assert with_prefix("sks,", "a cat") == "sks, a cat"
    assert with_prefix("sks", "a cat") == "sks a cat"


def test_cli_caption(tiny_blip_dir, image_dir, capsys):
    argv = ["caption", str(image_dir), "--model", str(tiny_blip_dir), "--prefix", "sks, "]
    assert main(argv + ["--batch-size", "3", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "2 captions written, 1 existing captions kept, 1 images failed" in out
    assert "bad.png" in out
    assert (image_dir / "new.txt").read_text(encoding="utf-8").startswith("sks, ")


def test_cli_missing_model_is_one_line_error(tmp_path, image_dir, capsys):
    code = main(["caption", str(image_dir), "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "nope" in err and "does not exist" in err
