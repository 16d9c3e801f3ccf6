"""Text-to-image generation with a base pipeline and optional LoRA adapters."""

from __future__ import annotations

from PIL import Image


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
    """Images for seeds seed, seed+1, ...: each image depends only on its own seed.

    The text-to-image case of `sdtune.generate.run.generate`, kept for the training loop's
    samples; it runs through the same request path as every other mode.
    """
    from sdtune.generate.engine import run_request
    from sdtune.generate.request import GenerationRequest, check_numbers, seeds_for

    seeds = seeds_for(seed, num_images)
    request = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seeds=seeds,
        batch_size=len(seeds),
        width=width,
        height=height,
    )
    check_numbers(request)
    return run_request(pipe, request).images
