"""Every item carries its original size, crop top-left and target size, as SDXL's
micro-conditioning counts them (original size before resizing, crop in the resized image), for
square crops, random crops, flips and buckets; the numbers reproduce the item's pixels, and
collation (plain, DreamBooth pairs, the cache pass) keeps them."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdtune.config import load_config
from sdtune.data.dataset import ImageCaptionDataset, view_rng
from sdtune.data.sources import Sample, scan_data_config
from sdtune.data.transforms import fit_to_bucket, resize_and_crop, to_tensor
from sdtune.models.tokenizer import load_tokenizer
from sdtune.train.setup import build_dataloader, make_collate


def gradient(size: tuple[int, int]) -> Image.Image:
    """An image with no symmetry, so any wrong offset or a missed flip changes the pixels."""
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x * 255 // width, y * 255 // height, (x * 7 + y * 13) % 256], -1)
    return Image.fromarray(rgb.astype(np.uint8))


def write(folder, sizes):
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        gradient(size).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"image {i}")
    return folder


def redo(path, item) -> torch.Tensor:
    """The item's pixels rebuilt from its numbers alone: resize the source so the target fits as
    a crop at `crop_top_left` (a plain resize of the short side, or of the bucket's cover)."""
    source = Image.open(path).convert("RGB")
    (height, width), (top, left) = item["target_size"], item["crop_top_left"]
    assert item["original_size"] == (source.height, source.width)
    scale = max(width / source.width, height / source.height)
    resized = (max(width, round(source.width * scale)), max(height, round(source.height * scale)))
    img = source.resize(resized, Image.Resampling.LANCZOS)
    return to_tensor(img.crop((left, top, left + width, top + height)))


def dataset(folder, **kw) -> ImageCaptionDataset:
    samples = [Sample(p, "x") for p in sorted(folder.glob("*.png"))]
    return ImageCaptionDataset(samples, 64, seed=3, **kw)


def test_a_centre_square_crop_of_a_wide_image(tmp_path):
    folder = write(tmp_path / "d", [(300, 200)])
    item = dataset(folder)[0]
    # Short side 200 -> 64: 96 x 64, the centre square starts (96 - 64) // 2 = 16 px in.
    assert item["original_size"] == (200, 300)
    assert item["crop_top_left"] == (0, 16)
    assert item["target_size"] == (64, 64)
    assert torch.equal(item["pixel_values"], redo(folder / "img0.png", item))


def test_random_crops_of_a_tall_image_follow_the_seeded_draws(tmp_path):
    folder = write(tmp_path / "d", [(120, 300)])  # short side -> 64: 64 x 160
    data = dataset(folder, center_crop=False, repeats=3)
    tops = set()
    for epoch in range(4):
        for index in range(3):
            item = data[epoch * 3 + index]
            # The crop draws left, then top, from the item's own stream.
            rng = view_rng(3, epoch, index)
            left, top = rng.randint(0, 0), rng.randint(0, 160 - 64)
            assert item["crop_top_left"] == (top, left)
            assert item["original_size"] == (300, 120) and item["target_size"] == (64, 64)
            assert torch.equal(item["pixel_values"], redo(folder / "img0.png", item))
            tops.add(top)
    assert len(tops) > 1  # the crops really moved


def test_a_flipped_item_counts_its_crop_in_the_flipped_image(tmp_path):
    folder = write(tmp_path / "d", [(300, 200)])  # 96 x 64 after resizing
    data = dataset(folder, center_crop=False, random_flip=True, repeats=4)
    source = Image.open(folder / "img0.png").resize((96, 64), Image.Resampling.LANCZOS)
    mirrored = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flips = []
    for index in range(len(data)):
        item = data[index]
        top, left = item["crop_top_left"]
        box = (left, top, left + 64, top + 64)
        plain = torch.equal(item["pixel_values"], to_tensor(source.crop(box)))
        flipped = torch.equal(item["pixel_values"], to_tensor(mirrored.crop(box)))
        assert plain != flipped  # exactly one reading of the numbers gives the pixels
        flips.append(flipped)
    assert any(flips) and not all(flips)


def test_the_original_size_is_the_upright_one(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300 x 200, shown rotated a quarter turn: 200 wide, 300 tall
    gradient((300, 200)).save(folder / "img0.png", exif=exif)
    item = dataset(folder)[0]
    assert item["original_size"] == (300, 200)


def bucket_cfg(folder, **extra):
    values = {
        "model.path": "m",
        "data.dir": str(folder),
        "data.resolution": 128,
        "data.bucketing": True,
        "train.batch_size": 1,
    }
    return load_config(None, {**values, **extra})


@pytest.mark.parametrize("upscale", [False, True], ids=["smaller-bucket", "upscaled"])
def test_buckets_cover_and_crop_with_and_without_upscaling(tmp_path, upscale):
    # 100 x 45: its nearest bucket (192 x 64) is larger than it. Without upscaling it shrinks in
    # 64 px steps to 64 x 64: scale max(64/100, 64/45) = 1.42 -> 142 x 64, centre crop
    # (142 - 64) // 2 = 39 px in. With upscaling, 192 x 64: scale 1.92 -> 192 x 86, crop 11 down.
    folder = write(tmp_path / "d", [(100, 45)])
    cfg = bucket_cfg(folder, **{"data.upscale": upscale})
    loader, _ = build_dataloader(scan_data_config(cfg.data).samples, cfg, load_tokenizer(1))
    batch = next(iter(loader))
    expected = ((11, 0), (64, 192)) if upscale else ((0, 39), (64, 64))
    assert batch["original_size"].tolist() == [[45, 100]]
    assert batch["crop_top_left"].tolist() == [list(expected[0])]
    assert batch["target_size"].tolist() == [list(expected[1])]
    item = {k: tuple(batch[k][0].tolist()) for k in ("original_size", "crop_top_left")}
    item["target_size"] = expected[1]
    assert torch.equal(batch["pixel_values"][0], redo(folder / "img0.png", item))


def test_a_padded_bucket_cuts_nothing(tmp_path):
    # 300 x 120 into the 192 x 64 bucket: fitted inside at 160 x 64, pasted 16 px in; no crop.
    folder = write(tmp_path / "d", [(300, 120)])
    cfg = bucket_cfg(folder, **{"data.pad": True, "data.random_flip": True})
    loader, _ = build_dataloader(scan_data_config(cfg.data).samples, cfg, load_tokenizer(1))
    for batch in [b for _ in range(3) for b in loader]:  # flipped or not: nothing was cut
        assert batch["original_size"].tolist() == [[120, 300]]
        assert batch["crop_top_left"].tolist() == [[0, 0]]
        assert batch["target_size"].tolist() == [[64, 192]]


def test_items_keep_the_pixels_the_transforms_gave(tmp_path):
    # The sizes ride along without changing a pixel or a random draw: the same item through
    # the plain transforms, with the item's own stream, gives the same tensor.
    folder = write(tmp_path / "d", [(300, 200), (90, 210)])
    square = dataset(folder, center_crop=False, random_flip=True, repeats=2)
    bucketed = dataset(folder, center_crop=False, random_flip=True, repeats=2)
    bucketed.buckets, bucketed.crop = [(128, 64), (64, 128)], "random"
    for index in range(8):
        epoch, i = divmod(index, 4)
        image = Image.open(folder / f"img{i % 2}.png").convert("RGB")
        rng = view_rng(3, epoch, i)
        want = to_tensor(resize_and_crop(image, 64, False, rng))
        want = want.flip(-1) if rng.random() < 0.5 else want
        assert torch.equal(square[index]["pixel_values"], want)
        rng = view_rng(3, epoch, i)
        want = to_tensor(fit_to_bucket(image, bucketed.buckets[i % 2], "random", rng))
        want = want.flip(-1) if rng.random() < 0.5 else want
        assert torch.equal(bucketed[index]["pixel_values"], want)


def test_collation_and_the_cache_pass_carry_the_sizes(tmp_path):
    folder = write(tmp_path / "d", [(300, 200), (200, 300), (64, 64)])
    data = dataset(folder, center_crop=False)
    items = [data[i] for i in range(3)]
    collate = make_collate(load_tokenizer(1), pixel_keys=True)  # as with the latent cache on
    batch = collate(items)
    for key in ("original_size", "crop_top_left", "target_size"):
        assert batch[key].dtype == torch.long and batch[key].shape == (3, 2)
        assert batch[key].tolist() == [list(item[key]) for item in items]
    # The cache pass reads single items through a DataLoader (which turns tuples into lists)
    # and batches them with the run's collate: the cached items keep their sizes.
    single = DataLoader(data, batch_size=None, generator=torch.Generator())
    again = collate(list(single))
    assert len(again["pixel_keys"]) == 3
    for key in ("original_size", "crop_top_left", "target_size"):
        assert torch.equal(again[key], batch[key])


def test_hand_built_items_without_sizes_still_batch():
    items = [{"pixel_values": torch.zeros(3, 8, 8), "caption": "a", "draw": 0}]
    batch = make_collate(load_tokenizer(1))(items)
    assert "original_size" not in batch and batch["pixel_values"].shape == (1, 3, 8, 8)
