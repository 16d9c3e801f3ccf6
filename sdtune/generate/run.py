"""Generate to a folder: load the base and adapters, draw, write PNGs with their parameters."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdtune.adapters.io import read_adapter_metadata, resolve_adapter_path
from sdtune.errors import SdtuneError
from sdtune.generate.outputs import GenerationParams, save_grid, save_png
from sdtune.generate.txt2img import generate_images, load_adapters

logger = logging.getLogger("sdtune.generate")


def pick_device(requested: str | None) -> torch.device:
    """The requested device, or CUDA when present, else the CPU; a clear error for absent CUDA."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtuneError(
            f"--device {requested} was asked for but CUDA is not available here; use cpu"
        )
    return device


def base_model_of(adapters: list[tuple[str, float]]) -> str:
    """The base model recorded in the first adapter that names one."""
    for path, _ in adapters:
        base = read_adapter_metadata(resolve_adapter_path(path)).get("base_model")
        if base:
            return base
    raise SdtuneError("no base model given: pass --model (the adapters do not name their base)")


def generate_to_folder(
    prompt: str,
    out_dir: str | Path,
    model: str | None = None,
    family: str | None = None,
    adapters: list[tuple[str, float]] | None = None,
    fuse: bool = False,
    negative_prompt: str = "",
    num_images: int = 1,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    device: str | None = None,
) -> list[Path]:
    from sdtune.models.loading import load_pipeline

    adapters = adapters or []
    if num_images < 1 or steps < 1:
        raise SdtuneError("--num-images and --steps must be at least 1")
    for path, _ in adapters:
        resolve_adapter_path(path)  # a missing adapter fails before the model loads
    model = model or base_model_of(adapters)
    target = pick_device(device)
    dtype = torch.float16 if target.type == "cuda" else torch.float32
    pipe = load_pipeline(model, family=family, torch_dtype=dtype)
    pipe.to(target)
    pipe.set_progress_bar_config(disable=True)
    load_adapters(pipe, adapters, fuse=fuse)
    images = generate_images(
        pipe, prompt, negative_prompt, num_images, steps, guidance_scale, seed, width, height
    )
    paths = []
    for i, image in enumerate(images):
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + i,
            width=image.width,
            height=image.height,
            scheduler=type(pipe.scheduler).__name__,
            model=str(model),
            adapters=adapters,
        )
        paths.append(save_png(image, out_dir, params, stem=f"seed{seed + i}"))
    if len(images) > 1:
        paths.append(save_grid(images, out_dir, stem=f"grid-seed{seed}"))
    return paths
