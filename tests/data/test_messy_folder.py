"""A folder as users really have them: odd modes, broken files, bad caption bytes."""

import logging

import numpy as np
import pytest
from PIL import Image

from sdtune.config import load_config
from sdtune.data import images
from sdtune.data.dataset import ImageCaptionDataset
from sdtune.data.sources import Sample, scan_image_folder

GOOD = ["cmyk.jpg", "gray16.png", "palette_alpha.png", "plain.png", "rotated.jpg"]
BAD = {
    "corrupt.png": "cannot decode",
    "empty.jpg": "empty file (0 bytes)",
    "huge.png": "over the 10000 limit",
    "truncated.jpg": "cannot decode",
}


def write_messy_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "red").save(folder / "plain.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(folder / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (80, 48), "green").save(folder / "rotated.jpg", exif=exif)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (64, 64), "blue").save(folder / "whole.jpg")
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (120, 100), "white").save(folder / "huge.png")  # over the patched limit
    (folder / "plain.txt").write_bytes(b"caf\xe9, red, square")  # Windows-1252
    (folder / "cmyk.txt").write_bytes(b"  \n")  # empty
    (folder / "gray16.txt").write_bytes(b"grey\x00 square\x1b[0m, \xe2\x80\x8bplain")
    (folder / "notes.md").write_text("not an image")


@pytest.fixture
def messy(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    folder = tmp_path / "messy"
    write_messy_folder(folder)
    return folder


def test_scan_uses_the_good_images_and_names_every_skipped_file(messy):
    report = scan_image_folder(messy, trigger="sks")
    assert sorted(s.image_path.name for s in report.samples) == GOOD
    assert {p.name: r for p, r in report.skipped}.keys() == BAD.keys()
    summary = report.summary()
    for name, reason in BAD.items():
        line = next(x for x in summary.splitlines() if name in x and "skipped" in x)
        assert reason in line, line
    captions = {s.image_path.name: s.caption for s in report.samples}
    assert captions["plain.png"] == "sks, café, red, square"
    assert captions["gray16.png"] == "sks, grey square[0m, plain"
    assert captions["cmyk.jpg"] == "sks"  # empty sidecar: the template
    assert "1 captions not UTF-8" in summary and "plain.txt" in summary
    assert "1 captions had control" in summary and "gray16.txt" in summary
    assert "1 captions were empty" in summary and "cmyk.txt" in summary
    assert images.load_image(messy / "rotated.jpg").size == (48, 80)


def test_messy_folder_trains_to_the_end(messy, tiny_sd1_dir, tmp_path, caplog):
    from sdtune.train.loop import train

    cfg = load_config(
        None,
        {
            "model.path": str(tiny_sd1_dir),
            "data.dir": str(messy),
            "data.trigger": "sks",
            "data.resolution": 64,
            "data.shuffle_tags": True,
            "data.keep_tags": 1,
            "data.tag_dropout": 0.5,
            "data.caption_dropout": 0.2,
            "train.max_steps": 2,
            "train.batch_size": 2,
            "output.dir": str(tmp_path / "run"),
        },
    )
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert result.steps == 2 and np.isfinite(result.last_loss) and result.adapter_path.is_file()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "5 images usable, 4 skipped" in logged
    assert all(name in logged for name in BAD)


def test_an_image_broken_after_the_scan_is_replaced_not_fatal(tmp_path, caplog):
    for name, colour in [("a.png", "red"), ("b.png", "green"), ("c.png", "blue")]:
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    samples = [Sample(tmp_path / n, n) for n in ("a.png", "b.png", "c.png")]
    dataset = ImageCaptionDataset(samples, resolution=16, repeats=2)
    (tmp_path / "a.png").unlink()
    (tmp_path / "b.png").write_bytes(b"overwritten")
    with caplog.at_level(logging.WARNING, logger="sdtune.data"):
        items = [dataset[i] for i in range(len(dataset))] + [dataset[0]]
    assert [item["caption"] for item in items] == ["c.png"] * 3 + ["c.png"] * 3 + ["c.png"]
    assert sorted(p.name for p in dataset.failed) == ["a.png", "b.png"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "a.png" in warnings[0] and "b.png" in warnings[1]
