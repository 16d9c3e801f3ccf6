"""The cache pass before training: every entry encoded once (across repeats and processes),
then only read."""

import re

from sdtune.config import load_config
from sdtune.train.loop import train

PASS = r"cache pass over (\d+) items: latents (\d+) encoded, (\d+) read; text embeddings (\d+) encoded, (\d+) read"


def _settings(tiny_sd1_dir, star_images, out, cache, **extra):
    return {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 64,
        "data.cache_latents": True,
        "data.cache_text_embeddings": True,
        "data.cache_dir": str(cache),
        "lora.rank": 4,
        "train.batch_size": 2,
        "train.max_steps": 2,
        "output.dir": str(out),
        **extra,
    }


def _totals(text: str, name: str) -> tuple[int, int]:
    """(read, encoded) from a run's closing line on one cache."""
    found = re.search(rf"{name} cache \S+: (\d+) read, (\d+) encoded", text)
    return int(found[1]), int(found[2])


def _unique_captions(star_images) -> int:
    return len({p.read_text(encoding="utf-8").strip() for p in star_images.glob("*.txt")})


def _entries(folder) -> int:
    return len(list(folder.rglob("*.safetensors")))


def test_the_pass_encodes_each_entry_once_and_training_only_reads(
    tiny_sd1_dir, star_images, tmp_path, caplog
):
    cache, captions = tmp_path / "cache", _unique_captions(star_images)
    runs = []
    for name in ("cold", "warm"):
        caplog.clear()
        settings = _settings(tiny_sd1_dir, star_images, tmp_path / name, cache)
        with caplog.at_level("INFO", logger="sdtune.train"):
            train(load_config(None, {**settings, "data.repeats": 2}))
        runs.append("\n".join(r.getMessage() for r in caplog.records))
    cold, warm = runs
    # 16 items (8 images twice, centre crops): each image and caption is encoded once.
    assert re.search(PASS, cold).groups() == tuple(map(str, (16, 8, 8, captions, 16 - captions)))
    assert _totals(cold, "latent") == (8 + 4, 8)  # training's 2 steps of 2 items only read
    assert _totals(cold, "text-embedding") == (16 - captions + 4, captions)
    assert re.search(PASS, warm).groups() == ("16", "0", "16", "0", "16")
    assert _entries(cache) == 8 + captions


def test_two_processes_encode_each_entry_once(
    tiny_sd1_dir, star_images, tmp_path, train_in_two_processes
):
    """torchrun starts 2 CPU processes (gloo): the main one builds the cache, both read it."""
    cache = tmp_path / "cache"
    overrides = _settings(tiny_sd1_dir, star_images, tmp_path / "two", cache)
    stdout = train_in_two_processes([f"{key}={value}" for key, value in overrides.items()])
    assert "x 2 processes = 4" in stdout
    assert len(re.findall(PASS, stdout)) == 1
    captions = _unique_captions(star_images)
    # Totals over both processes: nothing encoded twice, and each process read its 2 steps.
    assert _totals(stdout, "latent") == (8, 8) == (8, _entries(cache) - captions)
    assert _totals(stdout, "text-embedding") == (8 - captions + 8, captions)
