"""What the dataset page costs on a folder of many images: listing, crop plan, thumbnails.

    .venv/bin/python scripts/bench_dataset_page.py [--images 1000] [--side 256] [--repeat 3]

Makes a folder of random-noise PNGs (sides from --side/2 to --side, so every aspect occurs)
with a caption each in a temporary folder, then times: the listing (sizes from headers), the
same listing decoding every image, the scan training runs, the bucket dry run, thumbnails of
every image with an empty cache (each decoded and encoded) and again with a warm cache (each
found by name). Each time is the best of --repeat runs, except the cold thumbnails, made once.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.config import DataConfig
from sdtune.data.editing import bucket_plan, list_dataset
from sdtune.data.sources import scan_image_folder
from sdtune.data.thumbnails import thumbnail


def make_folder(root: Path, count: int, side: int) -> list[Path]:
    rng = random.Random(0)
    gen = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = rng.randint(side // 2, side), rng.randint(side // 2, side)
        pixels = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = root / f"img{i:05d}.png"
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text(f"sks, photo {i % 7}, noise")
        paths.append(path)
    return paths


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=256, help="longest side of the images")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "thumbs"
        root.mkdir()
        start = time.perf_counter()
        paths = make_folder(root, args.images, args.side)
        print(
            f"made {len(paths)} PNGs of {args.side // 2}-{args.side} px a side in "
            f"{time.perf_counter() - start:.1f} s"
        )
        view = list_dataset(root)
        assert len(view.items) == len(paths), view.skipped[:3]
        listing = best_of(args.repeat, lambda: list_dataset(root))
        verified = best_of(args.repeat, lambda: list_dataset(root, verify=True))
        scan = best_of(args.repeat, lambda: scan_image_folder(root))
        data = DataConfig(dir=str(root), bucketing=True)
        plan = best_of(args.repeat, lambda: bucket_plan(data))
        plan_fast = best_of(args.repeat, lambda: bucket_plan(data, verify=False))
        start = time.perf_counter()
        for path in paths:
            thumbnail(cache, path)
        cold = time.perf_counter() - start
        warm = best_of(args.repeat, lambda: [thumbnail(cache, p) for p in paths])
    n = len(paths)
    rows = [
        ("list_dataset (header sizes)", listing),
        ("list_dataset(verify=True) (decodes)", verified),
        ("scan_image_folder (training's scan)", scan),
        ("bucket_plan (scan + geometry)", plan),
        ("bucket_plan(verify=False) (headers)", plan_fast),
        ("thumbnails, cold cache", cold),
        ("thumbnails, warm cache", warm),
    ]
    for name, seconds in rows:
        print(f"{name:<38} {seconds:8.3f} s  {seconds / n * 1e3:7.3f} ms/image")
    print(f"verified listing / header listing: {verified / listing:.1f}x")
    print(f"thumbnails cold / warm: {cold / warm:.1f}x")


if __name__ == "__main__":
    main()
