"""Train a LoRA on a tiny SD 1 model, then check what users rely on about the saved adapter."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open

from sdtune.adapters.io import read_adapter_metadata
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.loop import train

PROMPT = "a red sks star on a white background"


def _images(pipe) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=4, generator=gen, output_type="np").images


@pytest.fixture(scope="module")
def trained(tiny_sd1_dir, star_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    cfg = load_config(
        None,
        {
            "model.path": str(tiny_sd1_dir),
            "data.dir": str(star_images),
            "data.resolution": 64,
            "lora.rank": 4,
            "lora.alpha": 8,
            "lora.train_text_encoder": True,  # alpha != rank on purpose
            "train.max_steps": 8,
            "train.batch_size": 4,
            "train.learning_rate": 1e-2,
            "output.dir": str(out),
            "output.export_kohya": True,
        },
    )
    return train(cfg)


def test_run_folder_holds_adapter_config_and_logs(trained):
    assert trained.steps == 8 and np.isfinite(trained.last_loss)
    assert trained.adapter_path.is_file()
    saved = yaml.safe_load((trained.output_dir / "config.yaml").read_text())
    assert saved["lora"]["rank"] == 4 and saved["train"]["max_steps"] == 8
    assert list(trained.output_dir.rglob("events.out.tfevents.*")), "no TensorBoard log written"
    meta = read_adapter_metadata(trained.adapter_path)
    assert meta["family"] == "sd1" and meta["rank"] == "4" and meta["alpha"] == "8.0"
    assert json.loads(meta["config"])["data"]["trigger"] == ""
    card = (trained.output_dir / "README.md").read_text()
    assert card.startswith("---\n") and "pytorch_lora_weights.safetensors" in card


def test_only_lora_tensors_are_saved_for_unet_and_text_encoder(trained):
    with safe_open(str(trained.adapter_path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys) and any(
        k.startswith("text_encoder.") for k in keys
    )
    assert all("lora" in k for k in keys)


def test_reloaded_adapter_gives_identical_images(trained, tiny_sd1_dir):
    in_memory = _images(trained.pipeline)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    fresh.set_progress_bar_config(disable=True)
    base = _images(fresh)
    fresh.load_lora_weights(str(trained.adapter_path))  # diffusers' own loader
    reloaded = _images(fresh)
    np.testing.assert_allclose(reloaded, in_memory, atol=1e-5)
    assert np.abs(base - reloaded).max() > 1e-2, "the adapter does not change the output"
    fresh.fuse_lora()
    np.testing.assert_allclose(_images(fresh), in_memory, atol=1e-4)  # fused equals live
    kohya = trained.output_dir / f"{trained.output_dir.name}.safetensors"  # output.export_kohya
    with safe_open(str(kohya), framework="pt") as f:
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())
    other = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    other.set_progress_bar_config(disable=True)
    other.load_lora_weights(str(kohya))
    np.testing.assert_allclose(_images(other), in_memory, atol=1e-5)


def test_generate_in_a_new_process_matches_in_memory(trained, tmp_path):
    out = tmp_path / "images"
    cmd = [
        sys.executable,
        "-m",
        "sdtune.cli.main",
        "generate",
        "--prompt",
        PROMPT,
        "--lora",
        str(trained.adapter_path),
        "--steps",
        "4",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    png = out / "seed0.png"  # base model found from the adapter's metadata
    written = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    expected = (_images(trained.pipeline)[0] * 255).round().astype(np.int16)
    assert np.abs(written - expected).max() <= 1
    assert PROMPT in Image.open(png).text["parameters"]


def test_a_second_run_into_the_same_folder_is_refused(trained, tiny_sd1_dir, star_images):
    cfg = load_config(
        None,
        {
            "model.path": str(tiny_sd1_dir),
            "data.dir": str(star_images),
            "output.dir": str(trained.output_dir),
        },
    )
    before = trained.adapter_path.read_bytes()
    with pytest.raises(SdtuneError, match="already holds files"):
        train(cfg)
    assert trained.adapter_path.read_bytes() == before


def test_trains_from_a_single_file_checkpoint_and_on_v_prediction(tmp_path, star_images):
    """The two other ways in: an original-layout .safetensors base, and an SD 2 768-v base."""
    from sdtune.models.original_layout import save_original_checkpoint
    from sdtune.models.tiny import build_tiny_pipeline

    sd1 = build_tiny_pipeline("sd1", seed=1)
    sd1.save_pretrained(tmp_path / "sd1-configs")
    checkpoint = save_original_checkpoint(sd1, tmp_path / "base.safetensors")
    build_tiny_pipeline("sd2-v", seed=1).save_pretrained(tmp_path / "sd2v")
    common = {
        "data.dir": str(star_images),
        "data.resolution": 64,
        "train.max_steps": 2,
        "train.batch_size": 2,
    }
    single = train(
        load_config(
            None,
            {
                **common,
                "model.path": str(checkpoint),
                "model.config_dir": str(tmp_path / "sd1-configs"),
                "output.dir": str(tmp_path / "a"),
            },
        )
    )
    assert read_adapter_metadata(single.adapter_path)["base_model"] == str(checkpoint)
    v_run = train(
        load_config(
            None,
            {**common, "model.path": str(tmp_path / "sd2v"), "output.dir": str(tmp_path / "b")},
        )
    )
    assert read_adapter_metadata(v_run.adapter_path)["family"] == "sd2-v"
    assert read_adapter_metadata(v_run.adapter_path)["prediction_type"] == "v_prediction"
    assert read_adapter_metadata(single.adapter_path)["prediction_type"] == "epsilon"
    assert v_run.pipeline.scheduler.config.prediction_type == "v_prediction"
