"""An inpainting LoRA (9-channel U-Net) trains on random masks and reloads in diffusers."""

import numpy as np
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from sdtune.config import load_config
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.inpainting import FULL_MASK_CHANCE, build_random_masks
from sdtune.train.loop import train


def test_masks_are_seeded_rectangles_or_everything():
    gens = [torch.Generator().manual_seed(i) for i in range(200)]
    masks = build_random_masks(gens, 64, 64, "cpu")
    again = build_random_masks(
        [torch.Generator().manual_seed(i) for i in range(200)], 64, 64, "cpu"
    )
    assert torch.equal(masks, again) and set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.flatten(1).mean(1) == 1).float().mean().item()
    assert abs(full - FULL_MASK_CHANCE) < 0.1
    for m in masks[masks.flatten(1).mean(1) < 1]:  # the others: one solid rectangle
        rows, cols = m[0].any(1).nonzero(), m[0].any(0).nonzero()
        box = m[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and m.sum() == box.numel()


def test_inpainting_lora_trains_and_reloads(tmp_path, star_images):
    build_tiny_pipeline("sd1-inpaint").save_pretrained(tmp_path / "base")
    result = train(
        load_config(
            None,
            {
                "model.path": str(tmp_path / "base"),
                "data.dir": str(star_images),
                "data.resolution": 64,
                "train.max_steps": 3,
                "train.batch_size": 2,
                "train.learning_rate": 1e-2,
                "output.dir": str(tmp_path / "run"),
                "output.sample_prompts": "a star",
                "output.sample_steps": 2,
            },
        )
    )
    assert (tmp_path / "run" / "samples" / "final-prompt0.png").is_file()
    image = Image.new("RGB", (64, 64), "white")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def paint(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt="a star",
            image=image,
            mask_image=mask,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    in_memory = paint(StableDiffusionInpaintPipeline(**result.pipeline.components))
    fresh = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "base")
    base = paint(fresh)
    fresh.load_lora_weights(str(result.adapter_path))
    np.testing.assert_allclose(paint(fresh), in_memory, atol=1e-5)
    assert np.abs(base - in_memory).max() > 1e-2
