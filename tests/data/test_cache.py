"""The latent cache: reused when nothing changed, rebuilt when an image changed, never stale."""

import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.data.synthetic import write_shape_dataset
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.loop import train


def _run(model, images, out, cache, **extra):
    return train(
        load_config(
            None,
            {
                "model.path": str(model),
                "data.dir": str(images),
                "data.resolution": 64,
                "data.cache_latents": True,
                "data.cache_dir": str(cache),
                "train.batch_size": 2,
                "train.max_steps": 4,
                "train.learning_rate": 1e-3,
                "output.dir": str(out),
                **extra,
            },
        )
    )


def _entries(cache):
    return sorted(p.name for p in cache.rglob("*.safetensors"))


def _same(a, b):
    first, second = load_file(str(a.adapter_path)), load_file(str(b.adapter_path))
    return all(torch.equal(first[k], second[k]) for k in first)


def test_cache_is_reused_rebuilt_and_keyed_on_the_vae(tiny_sd1_dir, tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    write_shape_dataset(images, count=6, size=64, seed=2)
    cold = _run(tiny_sd1_dir, images, tmp_path / "cold", cache)
    entries = _entries(cache)
    assert len(entries) == 6  # one per image (centre crops, no flips)
    warm = _run(tiny_sd1_dir, images, tmp_path / "warm", cache)
    assert _entries(cache) == entries and _same(cold, warm)  # read back, bit for bit

    uncached = _run(
        tiny_sd1_dir, images, tmp_path / "plain", cache, **{"data.cache_latents": False}
    )
    a, b = load_file(str(uncached.adapter_path)), load_file(str(cold.adapter_path))
    for key in a:  # the same draws; only batch-size rounding of the VAE differs
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-3)

    torn = next(cache.rglob("*.safetensors"))
    torn.write_bytes(torn.read_bytes()[:20])  # a torn entry (a kill during its write)
    _run(tiny_sd1_dir, images, tmp_path / "mended", cache)
    assert load_file(str(torn))["mean"].ndim == 3 and len(_entries(cache)) == 6  # encoded again

    Image.new("RGB", (64, 64), "orange").save(next(images.glob("*.png")))  # an edited image
    _run(tiny_sd1_dir, images, tmp_path / "edited", cache)
    assert len(_entries(cache)) == 7  # the edited image got a new entry, the rest were reused

    other = tmp_path / "other-vae"
    build_tiny_pipeline("sd1", seed=5).save_pretrained(other)
    _run(other, images, tmp_path / "other", cache)
    assert len(_entries(cache)) == 13  # another VAE never reads these entries


def test_the_loader_computes_the_keys_and_the_step_uses_them(tmp_path):
    """Keys come with the batch (hashed in loader workers); they name the same entries the
    cache would compute itself, and a different image gets a different key."""
    from sdtune.data.cache import LatentCache, pixel_digest
    from sdtune.models.tokenizer import load_tokenizer
    from sdtune.train.setup import make_collate

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    items = [{"pixel_values": p, "caption": "a", "draw": i} for i, p in enumerate(pixels)]
    batch = make_collate(load_tokenizer(1), pixel_keys=True)(items)
    assert batch["pixel_keys"] == [pixel_digest(p) for p in pixels]
    assert len(set(batch["pixel_keys"])) == 3
    assert "pixel_keys" not in make_collate(load_tokenizer(1))(items)  # no cache, no hashing

    cache = LatentCache(tmp_path, build_tiny_pipeline("sd1").vae, torch.float32)
    cold = cache.encode(batch["pixel_values"], batch["pixel_keys"])
    warm = cache.encode(batch["pixel_values"])  # keys computed by the cache itself
    assert (cache.misses, cache.hits) == (3, 3)
    assert all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
