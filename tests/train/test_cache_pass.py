"""The cache pass before training: every entry encoded once (across repeats and processes),
then only read."""

import re
import subprocess
import sys

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


def test_two_processes_encode_each_entry_once(tiny_sd1_dir, star_images, tmp_path):
    """torchrun starts 2 CPU processes (gloo): the main one builds the cache, both read it."""
    cache = tmp_path / "cache"
    overrides = _settings(tiny_sd1_dir, star_images, tmp_path / "two", cache)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "sdtune.cli.main",
        "train",
        *[f"{key}={value}" for key, value in overrides.items()],
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "x 2 processes = 4" in proc.stdout
    assert len(re.findall(PASS, proc.stdout)) == 1
    captions = _unique_captions(star_images)
    # Totals over both processes: nothing encoded twice, and each process read its 2 steps.
    assert _totals(proc.stdout, "latent") == (8, 8) == (8, _entries(cache) - captions)
    assert _totals(proc.stdout, "text-embedding") == (8 - captions + 8, captions)
