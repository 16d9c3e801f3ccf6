import pytest
from PIL import Image

from sdtune.data.captions import build_caption
from sdtune.data.dataset import ImageCaptionDataset
from sdtune.data.sources import scan_image_folder
from sdtune.errors import SdtuneError


def _image(path, colour="red", size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_sidecars_template_and_bad_files(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red\nsquare  ")
    _image(tmp_path / "sub" / "b.jpg", "blue")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "notes.md").write_text("ignored")
    report = scan_image_folder(tmp_path, caption_template="a photo of {trigger}", trigger="sks")
    captions = {s.image_path.name: s.caption for s in report.samples}
    assert captions == {"a.png": "sks, a red square", "b.jpg": "a photo of sks"}
    assert [p.name for p, _ in report.skipped] == ["broken.png"]
    assert "1 skipped" in report.summary() and "broken.png" in report.summary()
    assert len(scan_image_folder(tmp_path, recursive=False).samples) == 1


def test_trigger_is_not_added_twice():
    from pathlib import Path

    assert (
        build_caption("sks dog on grass", Path("x.png"), "{trigger}", "sks") == "sks dog on grass"
    )
    assert build_caption(None, Path("dog.png"), "{name} by {trigger}", "sks") == "dog by sks"


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(SdtuneError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(SdtuneError, match="is empty: no image files"):
        scan_image_folder(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"xx")
    with pytest.raises(SdtuneError, match="none decodable"):
        scan_image_folder(tmp_path)


def test_dataset_items_are_square_tensors_in_range(tmp_path):
    _image(tmp_path / "wide.png", "white", size=(100, 50))
    samples = scan_image_folder(tmp_path).samples
    dataset = ImageCaptionDataset(samples, resolution=32, repeats=3, random_flip=True)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert (dataset[1]["pixel_values"] == item["pixel_values"]).all()  # seeded per index


def test_random_crops_and_flips_change_with_the_epoch_and_repeat_within_it(tmp_path):
    from PIL import ImageDraw

    image = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 30, 63), fill="red")  # not symmetric: flips show
    image.save(tmp_path / "a.png")
    samples = scan_image_folder(tmp_path).samples
    dataset = ImageCaptionDataset(
        samples, resolution=32, center_crop=False, random_flip=True, seed=3
    )
    views = [dataset[epoch * len(dataset)]["pixel_values"] for epoch in range(8)]
    assert len({v.numpy().tobytes() for v in views}) > 1  # not the same view every epoch
    for epoch, view in enumerate(views):  # the same (seed, epoch, item): the same view
        assert (dataset[epoch * len(dataset)]["pixel_values"] == view).all()
