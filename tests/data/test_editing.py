"""The dataset editor's library: listing as training reads it, caption edits, the crop plan."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.config import RunConfig
from sdtune.data import files
from sdtune.data.editing import (
    bucket_plan,
    list_dataset,
    save_caption,
    set_trigger,
    tag_frequency,
)
from sdtune.data.images import load_image
from sdtune.data.sources import scan_image_folder
from sdtune.data.transforms import to_tensor
from sdtune.errors import SdtuneError


def _noise(size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture
def folder(tmp_path):
    """Captioned, uncaptioned, rotated, broken, torn, tiny and nested images."""
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    _noise((40, 24)).save(root / "a.png")
    (root / "a.txt").write_text("red,  square\n\tstudio", encoding="utf-8")
    _noise((30, 50), 1).save(root / "sub" / "b.jpg")  # no caption
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 20 wide, 36 tall
    _noise((36, 20), 2).save(root / "rot.jpg", exif=exif)
    (root / "rot.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    (root / "broken.png").write_bytes(b"not a png")
    (root / "empty.jpg").write_bytes(b"")
    _noise((5, 30), 3).save(root / "tiny.png")
    return root


def test_listing_matches_what_the_training_scan_reads(folder):
    view = list_dataset(folder)
    scan = scan_image_folder(folder)
    assert [i.path for i in view.items] == ["a.png", "rot.jpg", "sub/b.jpg"]
    assert [(i.width, i.height) for i in view.items] == [s.size for s in scan.samples]
    assert {i.path: i.caption for i in view.items if i.has_caption} == {
        "a.png": "red, square studio",
        "rot.jpg": "caf\xe9 au lait",
    }
    uncaptioned = view.items[2]
    assert uncaptioned.caption == "" and not uncaptioned.has_caption
    reasons = {Path(p).relative_to(folder).as_posix(): why for p, why in scan.skipped}
    assert {s.path: s.reason for s in view.skipped} == reasons
    assert set(reasons) == {"broken.png", "empty.jpg", "tiny.png"}
    json.dumps(asdict(view))  # what the web page receives


def test_a_file_torn_after_its_header_is_found_only_when_verified(folder):
    data = (folder / "a.png").read_bytes()
    (folder / "torn.png").write_bytes(data[: len(data) // 2])
    assert "torn.png" in [i.path for i in list_dataset(folder).items]
    verified = {s.path: s.reason for s in list_dataset(folder, verify=True).skipped}
    scan = {Path(p).name: why for p, why in scan_image_folder(folder).skipped}
    assert verified["torn.png"] == scan["torn.png"]


def test_metadata_captions_are_listed_and_not_edited_through_sidecars(folder):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from meta"}))
    view = list_dataset(folder)
    item = next(i for i in view.items if i.path == "a.png")
    assert (item.caption, item.caption_source, view.metadata) == (
        "from meta",
        "metadata.jsonl",
        "metadata.jsonl",
    )
    with pytest.raises(SdtuneError, match="metadata.jsonl"):
        save_caption(folder, "a.png", "new")
    with pytest.raises(SdtuneError, match="metadata.jsonl"):
        set_trigger(folder, "sks")
    assert (folder / "a.txt").read_text(encoding="utf-8").startswith("red")


def test_save_caption_replaces_the_sidecar_and_nothing_else(folder):
    image_bytes = (folder / "sub" / "b.jpg").read_bytes()
    sidecar = save_caption(folder, "sub/b.jpg", "ein Bild, gr\xfcn")
    assert sidecar == folder / "sub" / "b.txt"
    assert sidecar.read_text(encoding="utf-8") == "ein Bild, gr\xfcn\n"
    (folder / "a.txt").chmod(0o640)
    save_caption(folder, "a.png", "blue")
    assert (folder / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (folder / "sub" / "b.jpg").read_bytes() == image_bytes
    assert [i.caption for i in list_dataset(folder).items if i.path == "sub/b.jpg"] == [
        "ein Bild, gr\xfcn"
    ]
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_caption(folder, monkeypatch):
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(SdtuneError, match=r"a\.txt.*No space left"):
        save_caption(folder, "a.png", "lost")
    assert (folder / "a.txt").read_text(encoding="utf-8").startswith("red,  square")
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "name, message",
    [
        ("../outside.png", "no '..'"),
        ("sub/../../outside.png", "no '..'"),
        ("ABSOLUTE", "must be relative"),
        ("DEEP/ABSOLUTE", "must be relative"),
        ("link.png", "symbolic link"),
        ("linked_dir/outside.png", "symbolic link"),
        ("a.txt", "not an image"),
        ("missing.png", "no such file"),
    ],
)
def test_save_caption_refuses_paths_that_are_not_images_of_the_folder(folder, name, message):
    outside = folder.parent / "outside.png"
    _noise((20, 20)).save(outside)
    os.symlink(outside, folder / "link.png")
    os.symlink(folder.parent, folder / "linked_dir")
    if name.endswith("ABSOLUTE"):  # the message names the whole path, however deep
        deep = (
            folder.parent.joinpath(*["a-rather-long-folder-name"] * 6) if "DEEP" in name else None
        )
        if deep:
            deep.mkdir(parents=True)
            _noise((20, 20)).save(deep / "outside.png")
        name = str((deep or folder.parent) / "outside.png")
    with pytest.raises(SdtuneError, match=message) as err:
        save_caption(folder, name, "x")
    assert name in str(err.value)
    assert not outside.with_suffix(".txt").exists() and not (folder / "link.txt").exists()


def test_a_caption_extension_that_names_an_image_is_refused(folder):
    with pytest.raises(SdtuneError, match="'.png'"):
        save_caption(folder, "sub/b.jpg", "x", caption_ext=".png")
    assert not (folder / "sub" / "b.png").exists()


def test_set_trigger_adds_a_missing_trigger_in_front_and_creates_sidecars(folder):
    (folder / "a.txt").write_text("sksdog, red", encoding="utf-8")  # not the word sks
    (folder / "rot.txt").write_text("a photo of sks", encoding="utf-8")
    assert set_trigger(folder, "sks") == 2
    captions = {i.path: i.caption for i in list_dataset(folder).items}
    assert captions == {
        "a.png": "sks, sksdog, red",
        "rot.jpg": "a photo of sks",
        "sub/b.jpg": "sks",
    }
    assert set_trigger(folder, "sks") == 0  # nothing left to do, nothing rewritten
    trained = scan_image_folder(folder, trigger="sks").samples
    assert [s.caption for s in trained] == list(captions.values())


def test_set_trigger_replaces_an_old_trigger_as_a_whole_word(folder):
    (folder / "a.txt").write_text("ohwx, ohwxy, photo of ohwx", encoding="utf-8")
    (folder / "rot.txt").write_text("no trigger here", encoding="utf-8")
    assert set_trigger(folder, "sks", replace="ohwx") == 1
    assert (folder / "a.txt").read_text(encoding="utf-8") == "sks, ohwxy, photo of sks\n"
    assert (folder / "rot.txt").read_text(encoding="utf-8") == "no trigger here"
    assert not (folder / "sub" / "b.txt").exists()
    with pytest.raises(SdtuneError, match="trigger"):
        set_trigger(folder, "  ")


def test_tag_frequency_counts_tags_most_common_first(folder):
    (folder / "a.txt").write_text("sks, red, square", encoding="utf-8")
    (folder / "rot.txt").write_text("sks,square", encoding="utf-8")
    assert tag_frequency(folder) == [("sks", 2), ("square", 2), ("red", 1)]


SHAPES = [(200, 70), (70, 200), (130, 130), (60, 40), (150, 97)]
TOLERANCE = 3 / 127.5  # pillow resizes in two 8-bit passes, in another order when given a box


def _smooth(size, seed):
    """Detail a few pixels wide, mid-grey range: a box off by one pixel changes it a lot, yet
    Lanczos overshoot is not clipped (which would make the pass order matter on pure noise)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(48, 208, (size[1] // 4, size[0] // 4, 3), generator=gen)
    return Image.fromarray(small.to(torch.uint8).numpy()).resize(size, Image.Resampling.BILINEAR)


def _shifted(box):
    """The same plan with its crop one original pixel up or left, where there is room."""
    x0, y0, x1, y1 = box.crop
    if x0 >= 1:
        return replace(box, crop=(x0 - 1, y0, x1 - 1, y1))
    if y0 >= 1:
        return replace(box, crop=(x0, y0 - 1, x1, y1 - 1))
    return None


def _run_config(root: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.dir, cfg.data.resolution = str(root), 128
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _rebuild(path: Path, box) -> torch.Tensor:
    """The training pixels, remade from the plan alone: the box cut from the original."""
    img = load_image(path)
    x0, y0, x1, y1 = box.placed
    if box.padded:
        canvas = Image.new("RGB", box.bucket, (127, 127, 127))
        canvas.paste(img.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
        return to_tensor(canvas)
    return to_tensor(img.resize(box.bucket, Image.Resampling.LANCZOS, box=box.crop))


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"bucketing": True},
        {"bucketing": True, "upscale": True},
        {"bucketing": True, "pad": True},
    ],
)
def test_the_crop_plan_remakes_the_pixels_training_sees(tmp_path, data):
    from sdtune.models.tokenizer import load_tokenizer
    from sdtune.train.setup import build_dataloader

    for i, size in enumerate(SHAPES):
        _smooth(size, i).save(tmp_path / f"img{i}.png")
    cfg = _run_config(tmp_path, **data)
    plan = bucket_plan(cfg.data)
    samples = scan_image_folder(tmp_path).samples
    loader, _ = build_dataloader(samples, cfg, load_tokenizer(1))
    assert [b.path for b in plan] == [s.image_path.name for s in samples]
    for i, box in enumerate(plan):
        trained = loader.dataset.get(i)["pixel_values"]
        assert trained.shape[1:] == (box.bucket[1], box.bucket[0])
        rebuilt = _rebuild(tmp_path / box.path, box)
        assert (rebuilt - trained).abs().max() <= TOLERANCE, box
        if (off := _shifted(box)) is not None and not box.padded:  # the check can fail
            assert (_rebuild(tmp_path / box.path, off) - trained).abs().max() > 5 * TOLERANCE
    flags = {b.path: (b.upscaled, b.padded) for b in plan}
    if not data:  # square 128 crops: the 60x40 image is blown up, the 130x130 one is not
        assert flags["img3.png"] == (True, False) and flags["img2.png"] == (False, False)
    if data.get("pad"):
        assert flags["img0.png"][1] and not flags["img2.png"][1]
    json.dumps([asdict(b) for b in plan])


def test_held_out_images_are_marked_with_the_validation_square(tmp_path):
    """data.validation_split: the plan marks the images the run holds out, gives them the
    centred square the validation loss sees, and buckets the others as the training loader does."""
    from sdtune.data.sources import split_validation
    from sdtune.models.tokenizer import load_tokenizer
    from sdtune.train.setup import build_dataloader
    from sdtune.train.validation import build_validation_loader

    for i, size in enumerate(SHAPES * 2):
        _smooth(size, i).save(tmp_path / f"img{i}.png")
    cfg = _run_config(tmp_path, bucketing=True, validation_split=0.3)
    cfg.train.seed = 5
    plan = {b.path: b for b in bucket_plan(cfg.data, seed=cfg.train.seed)}
    training, held = split_validation(scan_image_folder(tmp_path).samples, 0.3, cfg.train.seed)
    assert {p for p, b in plan.items() if b.held_out} == {s.image_path.name for s in held}
    assert len(held) == 3
    tokenizer = load_tokenizer(1)
    loader, _ = build_dataloader(training, cfg, tokenizer)
    for i, sample in enumerate(training):
        box = plan[sample.image_path.name]
        trained = loader.dataset.get(i)["pixel_values"]
        assert trained.shape[1:] == (box.bucket[1], box.bucket[0])
        assert (_rebuild(tmp_path / box.path, box) - trained).abs().max() <= TOLERANCE
    validation = build_validation_loader(held, cfg, {"tokenizer": tokenizer})
    for i, sample in enumerate(held):
        box = plan[sample.image_path.name]
        assert box.bucket == (128, 128) and not box.random_crop
        seen = validation.dataset.get(i)["pixel_values"]
        assert (_rebuild(tmp_path / box.path, box) - seen).abs().max() <= TOLERANCE


def test_a_random_crop_is_marked_and_has_the_trained_size(tmp_path):
    for i, size in enumerate(SHAPES):
        _noise(size, i).save(tmp_path / f"img{i}.png")
    cfg = _run_config(tmp_path, bucketing=True, center_crop=False)
    centred = {b.path: b for b in bucket_plan(_run_config(tmp_path, bucketing=True).data)}
    for box in bucket_plan(cfg.data):
        assert box.random_crop
        assert box.crop == centred[box.path].crop and box.bucket == centred[box.path].bucket


def test_the_plan_from_headers_equals_the_plan_from_decoding(folder):
    cfg = _run_config(folder, bucketing=True, resolution=64)
    assert bucket_plan(cfg.data, verify=False) == bucket_plan(cfg.data)
    turned = next(b for b in bucket_plan(cfg.data, verify=False) if b.path == "rot.jpg")
    assert (turned.width, turned.height) == (20, 36)  # upright, as training sees it


def test_set_trigger_writes_nothing_when_an_image_leads_outside(folder):
    outside = folder.parent / "c.png"
    _noise((20, 20)).save(outside)
    os.symlink(outside, folder / "link.png")  # training reads it: a linked file is listed
    assert "link.png" in [i.path for i in list_dataset(folder).items]
    with pytest.raises(SdtuneError, match="link.png.*symbolic link"):
        set_trigger(folder, "sks")
    assert not (folder / "link.txt").exists() and not (folder / "sub" / "b.txt").exists()
