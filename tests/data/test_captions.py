from pathlib import Path

import pytest
from PIL import Image

from sdtune.config import load_config
from sdtune.data.captions import CaptionAugment, build_caption, caption_rng
from sdtune.data.dataset import EpochShuffleSampler, ImageCaptionDataset
from sdtune.data.sources import Sample
from sdtune.errors import SdtuneError

CAPTION = "sks, red, star, white background, centered, photo"


def _draw(augment: CaptionAugment, caption: str = CAPTION, seed=0, epoch=0, index=0) -> str:
    return augment.apply(caption, caption_rng(seed, epoch, index))


def test_seeded_caption_is_known_for_seed_epoch_and_index():
    augment = CaptionAugment(shuffle_tags=True, keep_tags=1, tag_dropout=0.25)
    assert _draw(augment, epoch=0, index=0) == "sks, white background, star, red"
    assert _draw(augment, epoch=1, index=0) == "sks, red, photo, star, white background"
    assert _draw(augment, epoch=3, index=7) == "sks, white background, red, star"
    assert _draw(augment, epoch=3, index=7) == _draw(augment, epoch=3, index=7)


def test_all_steps_off_leaves_the_caption_untouched():
    assert not CaptionAugment().active
    assert _draw(CaptionAugment(), "a,b ,  c") == "a,b ,  c"


def test_kept_tags_never_move_or_drop():
    augment = CaptionAugment(shuffle_tags=True, keep_tags=2, tag_dropout=0.9)
    seen = set()
    for index in range(300):
        tags = _draw(augment, index=index).split(", ")
        assert tags[:2] == ["sks", "red"]
        seen.add(tuple(tags[2:]))
    assert len(seen) > 10  # the rest really is shuffled and dropped


def test_tag_and_caption_dropout_rates_hold():
    tags = ", ".join(f"t{k}" for k in range(10))
    augment = CaptionAugment(tag_dropout=0.3)
    kept = sum(len(_draw(augment, tags, index=i).split(", ")) for i in range(2000))
    assert abs(1 - kept / 20_000 - 0.3) < 0.02
    augment = CaptionAugment(caption_dropout=0.25)
    empty = sum(_draw(augment, index=i) == "" for i in range(4000))
    assert abs(empty / 4000 - 0.25) < 0.02
    assert all(_draw(CaptionAugment(caption_dropout=1.0), index=i) == "" for i in range(50))


def test_other_separators_and_the_trigger_in_front():
    augment = CaptionAugment(shuffle_tags=True, keep_tags=1, tag_separator="|")
    out = _draw(augment, "sks|a|b|c", index=4)
    assert out.startswith("sks| ") and sorted(out.split("| ")[1:]) == ["a", "b", "c"]
    assert build_caption("a dog", Path("x.png"), "", "sks", separator="|") == "sks| a dog"
    with pytest.raises(SdtuneError, match="data.caption_template"):
        build_caption(None, Path("x.png"), "{subject} photo", "sks")


def test_dataset_caption_depends_only_on_seed_epoch_and_index(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    samples = [Sample(tmp_path / "a.png", CAPTION)]
    augment = CaptionAugment(shuffle_tags=True, keep_tags=1)

    def make(seed=0):
        return ImageCaptionDataset(samples, 16, repeats=4, seed=seed, augment=augment)

    dataset = make()
    assert dataset[5]["caption"] == _draw(augment, epoch=1, index=1)  # item 1 of epoch 1
    assert make()[5]["caption"] == dataset[5]["caption"]
    epoch0 = [dataset[i]["caption"] for i in range(4)]
    epoch1 = [dataset[4 + i]["caption"] for i in range(4)]
    assert len(set(epoch0)) > 1 and epoch0 != epoch1  # repeats and epochs differ
    assert (dataset[1]["pixel_values"] == dataset[5]["pixel_values"]).all()  # crops epoch-free


def test_sampler_counts_epochs_and_takes_set_epoch():
    sampler = EpochShuffleSampler(5, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(5)) and sorted(second) == list(range(5, 10))
    assert list(EpochShuffleSampler(5, seed=3)) == first  # seeded
    sampler.set_epoch(1)
    assert list(sampler) == second


def test_caption_options_are_range_checked():
    base = {"model.path": "m", "data.dir": "d"}
    for key, value in [
        ("data.tag_dropout", "1.5"),
        ("data.caption_dropout", "-0.1"),
        ("data.keep_tags", "-1"),
        ("data.tag_separator", ""),
    ]:
        with pytest.raises(SdtuneError, match=key):
            load_config(None, {**base, key: value})


def test_long_captions_are_counted_and_warned_once(tmp_path, caplog):
    from sdtune.models.tokenizer import load_tokenizer
    from sdtune.train.setup import build_dataloader

    tokenizer = load_tokenizer(1)
    long_text = ", ".join(f"detail number {k}" for k in range(40))  # ~120 tokens
    samples = []
    for name, caption in [("a", "a red star"), ("b", long_text), ("c", "sks, " + long_text)]:
        Image.new("RGB", (16, 16), "red").save(tmp_path / f"{name}.png")
        samples.append(Sample(tmp_path / f"{name}.png", caption))
    cfg = load_config(
        None,
        {
            "model.path": "m",
            "data.dir": str(tmp_path),
            "data.resolution": 16,
            "train.batch_size": 3,
        },
    )
    with caplog.at_level("WARNING", logger="sdtune.data"):
        loader, _ = build_dataloader(samples, cfg, tokenizer)
        for _ in range(2):
            batch = next(iter(loader))
    warnings = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 3 captions" in warnings[0] and "77 tokens" in warnings[0]
    assert "b.png" in warnings[0]
    assert batch["input_ids"].shape == (3, 77)
