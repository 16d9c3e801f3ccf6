"""The text-embedding cache: read when nothing changed, encoded again when a caption or the
text encoder changed, and training with it equals training without it."""

import re

import torch
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.data.prompts import encode_token_windows, tokenize_prompts
from sdtune.data.text_cache import TextEmbeddingCache
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.loop import train


def _entries(folder):
    return sorted(p.name for p in folder.rglob("*.safetensors"))


def test_entries_are_keyed_on_caption_encoder_dtype_and_windows(tmp_path):
    pipe = build_tiny_pipeline("sd1", seed=0)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    captions = ["sks, a red star", "sks, a blue star", "sks, a red star", ""]

    def encode(cache, texts, length=75):
        return cache.encode(texts, tokenize_prompts(tokenizer, texts, length)).embeds

    cache = TextEmbeddingCache(tmp_path, encoder, torch.float32)
    cold = encode(cache, captions)
    assert (cache.misses, cache.hits) == (3, 1)  # the repeated caption is encoded once
    with torch.no_grad():
        plain = encode_token_windows(encoder, tokenize_prompts(tokenizer, captions, 75))
    assert torch.equal(cold, plain)

    warm = TextEmbeddingCache(tmp_path, encoder, torch.float32)
    assert torch.equal(encode(warm, captions), cold) and (warm.misses, warm.hits) == (0, 4)
    encode(warm, ["sks, a red star", "sks, a green star"])  # one caption edited
    assert (warm.misses, warm.hits) == (1, 5) and len(_entries(tmp_path)) == 4

    windows = TextEmbeddingCache(tmp_path, encoder, torch.float32)
    assert encode(windows, captions[:1], 150).shape == (1, 154, 32) and windows.misses == 1

    other = build_tiny_pipeline("sd1", seed=5).text_encoder  # other weights, same config
    foreign = TextEmbeddingCache(tmp_path, other, torch.float32)
    assert not torch.equal(encode(foreign, captions[:1]), cold[:1]) and foreign.misses == 1
    half = TextEmbeddingCache(tmp_path, encoder, torch.bfloat16)
    encode(half, captions[:1])
    assert half.misses == 1 and len(_entries(tmp_path)) == 7

    torn = next(tmp_path.rglob("*.safetensors"))
    torn.write_bytes(torn.read_bytes()[:30])  # killed while writing
    mended = TextEmbeddingCache(tmp_path, encoder, torch.float32)
    encode(mended, captions)
    assert mended.misses <= 1 and load_file(str(torn))["embeddings"].ndim == 2


def test_sdxl_entries_hold_both_encoders_states_and_the_pooled_embedding(tmp_path, tiny_pipe):
    from sdtune.data.prompts import encode_prompt_conditioning
    from sdtune.models.components import Components

    pipe = tiny_pipe("sdxl")
    parts = Components.of(pipe)
    captions = ["sks, a red star", ""]
    ids = parts.tokenize(captions)

    def cache():
        return TextEmbeddingCache(
            tmp_path, parts.text_encoders, torch.float32, True, list(parts.tokenizer_map)
        )

    cold = cache().encode(captions, ids)
    warm = cache()
    read = warm.encode(captions, ids)
    assert (warm.hits, warm.misses) == (2, 0) and len(_entries(tmp_path)) == 2
    fresh, _ = encode_prompt_conditioning(pipe, captions, captions, 75)
    for got in (cold, read):
        torch.testing.assert_close(got.embeds, fresh.embeds, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.pooled, fresh.pooled, rtol=0, atol=1e-6)
    assert read.embeds.shape == (2, 77, 64) and read.pooled.shape == (2, 32)


def _run(model, images, out, cache, **extra):
    values = {
        "model.path": str(model),
        "data.dir": str(images),
        "data.resolution": 64,
        "data.center_crop": False,
        "data.random_flip": True,
        "data.shuffle_tags": True,
        "data.tag_separator": " ",
        "data.keep_tags": 1,
        "data.caption_dropout": 0.3,
        "data.cache_text_embeddings": True,
        "data.cache_dir": str(cache),
        "lora.rank": 4,
        "train.batch_size": 2,
        "train.max_steps": 6,
        "train.learning_rate": 1e-3,
        "output.dir": str(out),
        **extra,
    }
    return train(load_config(None, values))


def test_cached_training_equals_uncached_with_augmentation(
    tiny_sd1_dir, star_images, tmp_path, caplog
):
    cache = tmp_path / "cache"
    plain = _run(
        tiny_sd1_dir, star_images, tmp_path / "plain", cache, **{"data.cache_text_embeddings": 0}
    )
    assert not cache.exists()
    with caplog.at_level("INFO", logger="sdtune.train"):
        cold = _run(tiny_sd1_dir, star_images, tmp_path / "cold", cache)
    log = [r.getMessage() for r in caplog.records]
    caplog.clear()
    with caplog.at_level("INFO", logger="sdtune.train"):
        warm = _run(tiny_sd1_dir, star_images, tmp_path / "warm", cache)
    warm_log = [r.getMessage() for r in caplog.records]

    first, second, third = (load_file(str(r.adapter_path)) for r in (plain, cold, warm))
    assert first.keys() == second.keys() == third.keys()
    for key in first:  # the same encoder outputs, bit for bit, whether stored or not
        assert torch.equal(first[key], second[key]) and torch.equal(first[key], third[key]), key

    assert any("every caption variant is its own entry" in line for line in log)
    assert any("caption dropout reads the empty caption's entry" in line for line in log)
    # The pass builds the first epoch's 8 variants and the empty caption (dropped captions
    # among the 8 are the empty caption too: encoded once, then read); the second epoch's new
    # variants are encoded when drawn, each once.
    built = re.search(
        r"cache pass over 8 items: text embeddings (\d+) encoded, (\d+) read", "\n".join(log)
    )
    assert built and int(built[1]) + int(built[2]) == 9
    entries = len(_entries(cache))
    assert _totals(log) == (21 - entries, entries) and entries > int(built[1])
    assert _totals(warm_log) == (21, 0)  # every draw of the same seeded run is read back


def _totals(log):
    """(read, encoded) from the run's closing line on its text-embedding cache."""
    pattern = r"text-embedding cache .*: (\d+) read, (\d+) encoded$"
    found = [re.match(pattern, line) for line in log]
    return next((int(m[1]), int(m[2])) for m in found if m)


def test_a_trained_text_encoder_turns_the_cache_off_and_says_so(
    tiny_sd1_dir, star_images, tmp_path, caplog
):
    with caplog.at_level("INFO", logger="sdtune.train"):
        _run(
            tiny_sd1_dir,
            star_images,
            tmp_path / "run",
            tmp_path / "cache",
            **{"lora.train_text_encoder": True, "train.max_steps": 1},
        )
    off = [r.getMessage() for r in caplog.records if "text-embedding cache off" in r.getMessage()]
    assert len(off) == 1 and "lora.train_text_encoder=true" in off[0]
    assert not (tmp_path / "cache").exists()
