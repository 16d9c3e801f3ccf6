"""Text-to-image generation with a base pipeline and optional LoRA adapters."""

from __future__ import annotations

import torch
from PIL import Image

from sdtune.errors import SdtuneError


def load_adapters(pipe, adapters: list[tuple[str, float]], fuse: bool = False) -> None:
    """Attach each (file, weight) adapter live; with `fuse`, bake them into the base weights."""
    from sdtune.adapters.load import attach_adapter

    names = []
    for index, (path, _weight) in enumerate(adapters):
        # Any layout (sdtune/diffusers, PEFT, kohya/A1111), checked against the model first.
        name = f"adapter_{index}"
        attach_adapter(pipe, path, name)
        names.append(name)
    if names:
        pipe.set_adapters(names, [weight for _, weight in adapters])
        if fuse:
            pipe.fuse_lora(adapter_names=names)


def generate_images(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    num_images: int = 1,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
) -> list[Image.Image]:
    """Images for seeds seed, seed+1, ...: each image depends only on its own seed."""
    for name, value in (("width", width), ("height", height)):
        if value is not None and (value < 8 or value % 8):
            raise SdtuneError(f"{name} must be a positive multiple of 8, got {value}")
    device = pipe.device if pipe.device.type != "mps" else "cpu"
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(num_images)]
    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_images_per_prompt=num_images,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        width=width,
        height=height,
    )
    return result.images
