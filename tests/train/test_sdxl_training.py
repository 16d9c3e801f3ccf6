"""Train a LoRA on a tiny SDXL, and check what users rely on: plain diffusers loads the file with
every trained module and draws the image of the in-memory model; the U-Net sees each image's
real size and crop; each text encoder has its own rank, alpha and learning rate."""

import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.families import get_family
from sdtune.train.parts import text_encoder_loras

PROMPT = "a red sks star"
# (width, height) of the training images: two shapes, so buckets and crops differ
SIZES = [(96, 64), (96, 64), (64, 80), (64, 80)]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from sdtune.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_pipeline("sdxl", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks star number {i}")
    return folder


def _config(model, images, out, **extra):
    values = {
        "model.path": str(model),
        "data.dir": str(images),
        "data.resolution": 64,
        "data.bucketing": True,
        "data.bucket_step": 16,
        "data.upscale": True,
        "lora.rank": 4,
        "lora.alpha": 8,  # alpha != rank on purpose: a reload that loses alpha differs
        "lora.train_text_encoder": True,
        "lora.train_text_encoder_2": True,
        "lora.text_encoder_2_rank": 2,
        "lora.text_encoder_2_alpha": 1,
        "train.max_steps": 3,
        "train.batch_size": 2,
        "train.learning_rate": 1e-2,
        "output.dir": str(out),
        "output.log_with": "none",
        **extra,
    }
    return load_config(None, {k: str(v) for k, v in values.items()})


@pytest.fixture(scope="module")
def trained(sdxl_dir, odd_images, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from sdtune.train.loop import train

    seen = []  # (latent height and width, time ids) of every U-Net call while training
    original = UNet2DConditionModel.forward

    def forward(self, sample, *args, **kwargs):
        seen.append((sample.shape[-2:], kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return original(self, sample, *args, **kwargs)

    UNet2DConditionModel.forward = forward
    try:
        result = train(_config(sdxl_dir, odd_images, tmp_path_factory.mktemp("run") / "lora"))
    finally:
        UNet2DConditionModel.forward = original
    return result, seen


def _image(pipe):
    gen = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=2, generator=gen, output_type="np")
    return out.images


def _lora_modules(model) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")}


def test_diffusers_loads_every_trained_module_and_draws_the_in_memory_image(trained, sdxl_dir):
    """Plain diffusers' SDXL loader: all three parts, no warning, the same image."""
    from diffusers import StableDiffusionXLPipeline

    result, _ = trained
    in_memory = result.pipeline
    expected = _image(in_memory)
    fresh = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    fresh.set_progress_bar_config(disable=True)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fresh.load_lora_weights(str(result.adapter_path))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    problems = [str(w.message) for w in caught] + [
        m for m in messages if "lora" in m.lower() or "key" in m.lower()
    ]
    assert not problems, problems
    for part in ("unet", "text_encoder", "text_encoder_2"):
        trained_modules = _lora_modules(getattr(in_memory, part))
        assert trained_modules, part
        assert _lora_modules(getattr(fresh, part)) == trained_modules, part
    base = _image(StableDiffusionXLPipeline.from_pretrained(sdxl_dir))
    assert np.abs(expected - base).max() > 1e-3  # the adapter changes the image
    np.testing.assert_allclose(_image(fresh), expected, atol=1e-4)


def test_every_saved_module_trained_and_the_kohya_file_is_written(trained):
    """SDXL reads ViT-L's penultimate states, so its last layer would get no gradient: it has no
    LoRA, every module in the file moved off zero, and the A1111/ComfyUI file passes its check."""
    from safetensors.torch import load_file

    result, _ = trained
    state = load_file(str(result.adapter_path))
    ups = {k: v for k, v in state.items() if "lora_B" in k}
    assert ups and all(v.abs().sum() > 0 for v in ups.values()), [
        k for k, v in ups.items() if v.abs().sum() == 0
    ]
    last = result.pipeline.text_encoder.config.num_hidden_layers - 1
    te1 = {k for k in ups if k.startswith("text_encoder.")}
    assert te1 and not [k for k in te1 if f".layers.{last}." in k]
    assert [k for k in ups if k.startswith("text_encoder_2.") and f".layers.{last}." in k]
    kohya = result.adapter_path.parent / f"{result.adapter_path.parent.name}.safetensors"
    keys = load_file(str(kohya)).keys()
    assert any(k.startswith("lora_te1_") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)


def test_lora_targets_only_on_the_unread_last_layer_are_refused(tmp_path):
    from sdtune.models.tiny import build_tiny_pipeline
    from sdtune.train.setup import add_lora_adapters

    pipe = build_tiny_pipeline("sdxl", seed=0)
    last = pipe.text_encoder.config.num_hidden_layers - 1
    spec = rf"re:.*layers\.{last}\.self_attn\.q_proj"
    cfg = _config("unused", "unused", tmp_path, **{"lora.text_encoder_targets": spec})
    with pytest.raises(SdtuneError, match=r"only the last layer of text_encoder.*penultimate"):
        add_lora_adapters(pipe, cfg)


def test_the_unet_sees_each_images_real_size_and_crop(trained):
    """Micro-conditioning: original (h, w) is the file's size, the target is the bucket the
    pixels were cut to, and the crop lies inside the resized image."""
    _, seen = trained
    originals = {(h, w) for w, h in SIZES}
    assert seen
    for latent_side, ids in seen:
        target = (latent_side[0] * 8, latent_side[1] * 8)
        for row in ids.tolist():
            assert (int(row[0]), int(row[1])) in originals
            assert (int(row[4]), int(row[5])) == target
            assert row[2] >= 0 and row[3] >= 0
    targets = {(int(r[4]), int(r[5])) for _, ids in seen for r in ids.tolist()}
    assert len(targets) == 2  # two buckets: wide and tall


def test_each_text_encoder_has_its_own_rank_alpha_and_learning_rate(tiny_pipe, tmp_path):
    from sdtune.models.tiny import build_tiny_pipeline
    from sdtune.train.setup import add_lora_adapters

    cfg = _config(
        "unused",
        "unused",
        tmp_path,
        **{"train.text_encoder_learning_rate": 1e-3, "train.text_encoder_2_learning_rate": 2e-4},
    )
    pipe = build_tiny_pipeline("sdxl", seed=0)
    groups = add_lora_adapters(pipe, cfg)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3, 2e-4]
    te1 = pipe.text_encoder.peft_config["default"]
    te2 = pipe.text_encoder_2.peft_config["default"]
    assert (te1.r, te1.lora_alpha, te2.r, te2.lora_alpha) == (4, 8, 2, 1)
    only_second = _config("unused", "unused", tmp_path, **{"lora.train_text_encoder": False})
    parts = text_encoder_loras(only_second, get_family("sdxl"))
    assert [p.part for p in parts] == ["text_encoder_2"]


def test_a_second_text_encoder_on_a_one_encoder_family_is_refused(tmp_path):
    cfg = _config("unused", "unused", tmp_path)
    with pytest.raises(
        SdtuneError, match=r"lora.train_text_encoder_2=true, but family 'sd1' has no text_encoder_2"
    ):
        text_encoder_loras(cfg, get_family("sd1"))


def test_nan_latents_stop_the_run_and_are_never_cached(tiny_pipe, tmp_path):
    from sdtune.data.cache import LatentCache

    vae = tiny_pipe("sdxl").vae
    cache = LatentCache(tmp_path, vae, torch.float32)
    pixels = torch.zeros(2, 3, 64, 64)
    pixels[1] = float("nan")  # what an overflowing fp16 VAE gives
    with pytest.raises(SdtuneError, match=r"encoded 1 of 2 images .* NaN or infinite latents"):
        cache.encode(pixels)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    sdxl_dir, odd_images, tmp_path, monkeypatch
):
    """Exact resume with both text-encoder LoRAs, v-prediction with zero terminal SNR, min-SNR
    weighting and offset noise: the SDXL objectives all in one run."""
    from safetensors.torch import load_file

    import sdtune.train.loop as loop
    from sdtune.train.loop import train

    common = {
        "train.max_steps": 4,
        "train.batch_size": 1,
        "train.checkpoint_every_n_steps": 2,
        "train.prediction_type": "v_prediction",
        "train.zero_terminal_snr": True,
        "train.min_snr_gamma": 5.0,
        "train.noise_offset": 0.05,
        "data.random_flip": True,
    }
    whole = train(_config(sdxl_dir, odd_images, tmp_path / "whole", **common))
    real, calls = loop.training_step, {"n": 0}

    def crashing(batch, run):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(batch, run)

    monkeypatch.setattr(loop, "training_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(sdxl_dir, odd_images, tmp_path / "broken", **common))
    monkeypatch.undo()
    resumed = train(
        _config(sdxl_dir, odd_images, tmp_path / "broken", **common, **{"train.resume": "latest"})
    )
    first, second = load_file(str(whole.adapter_path)), load_file(str(resumed.adapter_path))
    assert first.keys() == second.keys()
    assert {k.split(".")[0] for k in first} == {"unet", "text_encoder", "text_encoder_2"}
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_two_processes_match_one_with_the_same_effective_batch(
    sdxl_dir, odd_images, tmp_path, train_in_two_processes
):
    """torchrun starts 2 CPU processes (gloo), each with half the batch: the adapter equals the
    one-process run's, so each item's size and random crop reach the U-Net on whichever rank
    draws it."""
    from safetensors.torch import load_file

    from sdtune.train.loop import train

    plain = {
        "data.bucketing": False,
        "data.center_crop": False,
        "data.shuffle_tags": False,
        "data.tag_dropout": 0.0,
        "train.ema_decay": 0.0,
    }
    single = train(
        _config(sdxl_dir, odd_images, tmp_path / "one", **plain, **{"train.batch_size": 4})
    )
    cfg = _config(sdxl_dir, odd_images, tmp_path / "two", **plain, **{"train.batch_size": 2})
    stdout = train_in_two_processes(cfg)
    assert "x 2 processes = 4" in stdout
    first = load_file(str(single.adapter_path))
    second = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert first.keys() == second.keys()
    assert {k.split(".")[0] for k in first} == {"unet", "text_encoder", "text_encoder_2"}
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=2e-5, rtol=1e-3)
