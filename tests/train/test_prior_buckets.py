"""Aspect-ratio buckets with DreamBooth prior preservation: each class image is fitted to its
instance's bucket, so every batch is one tensor of one shape, and such a run trains."""

import pytest
import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.data.sources import scan_data_config
from sdtune.models.tokenizer import load_tokenizer
from sdtune.train.loop import train
from sdtune.train.prior import scan_class_images
from sdtune.train.setup import build_dataloader

SHAPES = [(200, 70), (210, 72), (70, 200), (72, 210), (130, 130), (140, 140)]
BUCKETS = {(64, 192), (192, 64), (128, 128)}


@pytest.fixture
def folders(tmp_path):
    instances, classes = tmp_path / "mixed", tmp_path / "class"
    instances.mkdir()
    classes.mkdir()
    for i, size in enumerate(SHAPES):
        Image.new("RGB", size, (40 * i, 100, 200)).save(instances / f"img{i}.png")
    for i in range(2):  # square class images of one flat colour
        Image.new("RGB", (128, 128), (255, 0, 0)).save(classes / f"c{i}.png")
    return instances, classes


def _cfg(folders, out, **extra):
    instances, classes = folders
    values = {
        "model.path": "m",
        "data.dir": str(instances),
        "data.resolution": 128,
        "data.bucketing": True,
        "data.class_dir": str(classes),
        "data.class_prompt": "a square",
        "data.num_class_images": 2,  # both exist: none drawn
        "train.batch_size": 2,
        "output.dir": str(out),
    }
    return load_config(None, {**values, **extra})


def test_class_images_take_their_instances_bucket(folders, tmp_path):
    cfg = _cfg(folders, tmp_path / "run", **{"data.pad": True})
    samples = scan_data_config(cfg.data).samples
    loader, _ = build_dataloader(
        samples, cfg, load_tokenizer(1), class_samples=scan_class_images(cfg)
    )
    seen = set()
    for _ in range(2):  # two epochs
        for batch in loader:
            pixels, prior = batch["pixel_values"], batch["prior"]
            assert pixels.shape[0] == 4 and prior.tolist() == [False, False, True, True]
            height, width = pixels.shape[-2:]
            seen.add((width, height))
            # Each half carries its own images' sizes: instances first, then their class images
            # (128 x 128 squares); padded, so nothing was cropped.
            assert batch["target_size"].tolist() == [[height, width]] * 4
            originals = batch["original_size"].tolist()
            assert all((w, h) in SHAPES for h, w in originals[:2])
            assert originals[2:] == [[128, 128]] * 2
            assert batch["crop_top_left"].tolist() == [[0, 0]] * 4
            # Padded like the instances: a square class image in a tall or wide bucket keeps
            # its whole red square in the middle and grey bars at the far ends.
            red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)
            for image in pixels[2:]:
                middle = image[:, height // 2, width // 2]
                assert torch.allclose(middle.view(3, 1, 1), red, atol=0.02)
                if (width, height) != (128, 128):
                    assert image[:, 0, 0].abs().max() < 0.02  # grey pad (127 -> ~0)
    assert seen == BUCKETS


def test_a_bucketed_dreambooth_run_trains(folders, tiny_sd1_dir, tmp_path, caplog):
    cfg = _cfg(
        folders,
        tmp_path / "run",
        **{"model.path": str(tiny_sd1_dir), "lora.rank": 2, "train.max_steps": 3},
    )
    with caplog.at_level("INFO", logger="sdtune.train"):
        result = train(cfg)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.last_loss))
    assert result.adapter_path.is_file()
    assert "buckets: 64x192: 2, 128x128: 2, 192x64: 2" in caplog.text
    assert sorted(p.name for p in folders[1].iterdir()) == ["c0.png", "c1.png"]
