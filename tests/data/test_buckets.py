"""Aspect-ratio buckets: sizes, assignment without upscaling, crops in bounds, one bucket a batch."""

import random

import pytest
import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.data.buckets import BucketBatchSampler, assign_bucket, build_buckets
from sdtune.data.transforms import fit_to_bucket
from sdtune.train.loop import train


def test_buckets_are_multiples_of_the_step_within_area_and_aspect():
    buckets = build_buckets(512, 64, 3.0)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 3.0


def test_assignment_follows_the_aspect_and_never_upscales_unless_asked():
    buckets = build_buckets(512, 64, 3.0)
    assert assign_bucket((1600, 900), buckets)[0] > assign_bucket((1600, 900), buckets)[1]
    assert assign_bucket((900, 1600), buckets)[1] > assign_bucket((900, 1600), buckets)[0]
    small = assign_bucket((300, 200), buckets)
    assert small[0] <= 300 and small[1] <= 200 and small[0] % 64 == 0 and small[1] % 64 == 0
    assert assign_bucket((300, 200), buckets, upscale=True) in buckets


@pytest.mark.parametrize("crop", ["center", "random", "pad"])
def test_fit_gives_the_exact_size_and_pad_keeps_the_whole_image(crop):
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    out = fit_to_bucket(img, (128, 192), crop, random.Random(0))
    assert out.size == (128, 192)
    if crop == "pad":  # a wide image in a tall bucket: padded above and below, red in the middle
        assert out.getpixel((64, 2)) == (127, 127, 127) and out.getpixel((64, 96)) == (255, 0, 0)
    else:
        assert out.getpixel((0, 0)) == (255, 0, 0)


def test_batches_come_from_one_bucket_and_cover_every_item_each_epoch():
    per_index = [(64, 64)] * 7 + [(128, 64)] * 5
    sampler = BucketBatchSampler(per_index, batch_size=2, seed=1)
    first, second = list(sampler), list(sampler)  # each pass is the next epoch
    for batches, epoch in ((first, 0), (second, 1)):
        items = [i - epoch * 12 for b in batches for i in b]
        assert sorted(items) == list(range(12))
        assert all(len({per_index[i - epoch * 12] for i in b}) == 1 for b in batches)
    assert first != [[i - 12 for i in b] for b in second]  # reshuffled per epoch
    sampler.set_epoch(0)
    sampler.skip_next(4)  # resume after 2 micro-batches of 2
    assert list(sampler) == first[2:]


def test_a_step_holds_the_same_images_however_it_is_split():
    per_index = [(64, 64)] * 8 + [(128, 64)] * 8
    one = list(BucketBatchSampler(per_index, batch_size=4, seed=3))
    accumulated = list(BucketBatchSampler(per_index, batch_size=2, seed=3, accumulation=2))
    ranks = [
        list(BucketBatchSampler(per_index, batch_size=2, seed=3, rank=r, world_size=2))
        for r in (0, 1)
    ]
    for step, batch in enumerate(one):
        assert sorted(batch) == sorted(accumulated[2 * step] + accumulated[2 * step + 1])
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])


def test_training_with_buckets_on_mixed_shapes(tiny_sd1_dir, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(200, 70), (210, 72), (70, 200), (72, 210), (130, 130), (140, 140)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / f"img{i}.png")
    with caplog.at_level("INFO", logger="sdtune.train"):
        result = train(
            load_config(
                None,
                {
                    "model.path": str(tiny_sd1_dir),
                    "data.dir": str(folder),
                    "data.resolution": 128,
                    "data.bucketing": True,
                    "train.batch_size": 2,
                    "train.max_steps": 3,
                    "output.dir": str(tmp_path / "run"),
                },
            )
        )
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.last_loss))
    assert "buckets: 64x192: 2, 128x128: 2, 192x64: 2" in caplog.text
