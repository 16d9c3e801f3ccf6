"""Generate to a folder: load the base and adapters, draw in any mode, write PNGs with their
parameters. `generate` is the in-memory API over an already loaded pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdtune.adapters.io import read_adapter_metadata, resolve_adapter_path
from sdtune.errors import SdtuneError
from sdtune.generate.device import compile_unet, pick_device, pick_dtype, place_pipeline
from sdtune.generate.engine import GenerationResult, mode_pipeline, run_request
from sdtune.generate.modes import default_mode, get_mode
from sdtune.generate.outputs import GenerationParams, save_grid, save_png
from sdtune.generate.request import GenerationRequest, prepare_request, seeds_for
from sdtune.generate.snapshots import make_strip
from sdtune.generate.txt2img import load_adapters

__all__ = ["GenerationRequest", "generate", "generate_to_folder", "load_base", "pick_device"]

logger = logging.getLogger("sdtune.generate")


@dataclass
class SpeedOptions:
    """How the model runs: device, precision and the optional CUDA speed-ups."""

    device: str | None = None  # None: CUDA if present, else CPU
    dtype: str | None = None  # None: fp16 on CUDA, fp32 elsewhere
    channels_last: bool = False
    compile: bool = False  # torch.compile the U-Net (adapters get fused first)
    cpu_offload: bool = False  # keep models on the CPU until used (small GPUs)


def base_model_of(adapters: list[tuple[str, float]]) -> str:
    """The base model recorded in the first adapter that names one."""
    for path, _ in adapters:
        base = read_adapter_metadata(resolve_adapter_path(path)).get("base_model")
        if base:
            return base
    raise SdtuneError("no base model given: pass --model (the adapters do not name their base)")


def trained_max_token_length(adapters: list[tuple[str, float]]) -> int:
    """The data.max_token_length the first sdtune adapter was trained with; 75 if none says.

    Prompts are then encoded the way the adapter's captions were, in windows of 75 tokens."""
    for path, _ in adapters:
        raw = read_adapter_metadata(resolve_adapter_path(path)).get("config")
        try:
            return int(json.loads(raw)["data"]["max_token_length"])
        except (TypeError, ValueError, KeyError):
            continue
    return 75


def trained_zero_terminal_snr(adapters: list[tuple[str, float]]) -> bool:
    """Whether the first sdtune adapter that says so was trained with zero terminal SNR."""
    for path, _ in adapters:
        value = read_adapter_metadata(resolve_adapter_path(path)).get("zero_terminal_snr")
        if value is not None:
            return value == "true"
    return False


def _check_mode_before_loading(mode: str, model: str | None, family: str | None) -> None:
    """A bad mode, or one the model's family cannot run, fails before the weights load
    (a folder's family is read from its configs alone)."""
    from sdtune.generate.modes import check_mode_fits
    from sdtune.models.families import detect_family_from_folder

    spec = get_mode(mode)
    if family is not None:
        check_mode_fits(spec, family)
    elif model is not None and Path(model, "model_index.json").is_file():
        check_mode_fits(spec, detect_family_from_folder(model).name)


def generate(pipe: Any, request: GenerationRequest) -> GenerationResult:
    """Run `request` on a loaded pipeline of any family, in the request's mode.

    The caller's pipeline is not changed: another mode or scheduler runs on a view sharing its
    weights (and its adapters). Same seed and settings give the same image on the same device.
    """
    from sdtune.models.families import detect_family

    family = detect_family(pipe).name
    request = prepare_request(request, family)
    target = mode_pipeline(pipe, request.mode_spec)
    if request.scheduler is not None or request.zero_terminal_snr:
        from sdtune.generate.schedulers import set_scheduler, use_zero_terminal_snr

        if target is pipe:
            target = type(pipe).from_pipe(pipe)
            target.set_progress_bar_config(disable=True)
        if request.scheduler is not None:
            set_scheduler(target, request.scheduler)
        if request.zero_terminal_snr:
            use_zero_terminal_snr(target, request.scheduler)
    return run_request(target, request)


def load_base(
    model: str,
    family: str | None = None,
    adapters: list[tuple[str, float]] | None = None,
    fuse: bool = False,
    speed: SpeedOptions | None = None,
) -> Any:
    """The base pipeline with adapters loaded (live, or fused), placed for speed."""
    from sdtune.models.loading import load_pipeline

    speed = speed or SpeedOptions()
    device = pick_device(speed.device)
    dtype = pick_dtype(device, speed.dtype)
    pipe = load_pipeline(model, family=family, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if speed.compile and adapters and not fuse:
        logger.info("--compile: fusing the adapters into the weights first")
        fuse = True
    load_adapters(pipe, adapters or [], fuse=fuse)
    place_pipeline(
        pipe, device, dtype, channels_last=speed.channels_last, cpu_offload=speed.cpu_offload
    )
    if speed.compile:
        compile_unet(pipe)
    return pipe


def build_generation_params(
    pipe: Any,
    req: GenerationRequest,
    result: GenerationResult,
    model: str,
    adapters: list,
    index: int,
) -> GenerationParams:
    """The PNG parameters of image `index` of `result`, drawn by `generate(pipe, req)`."""
    from sdtune.generate.schedulers import a1111_name_of

    sampler, schedule = a1111_name_of(result.scheduler or pipe.scheduler)
    image = result.images[index]
    uses_strength = "strength" in dict(req.mode_spec.arguments)
    mask, extra = req.mask, {}
    if req.zero_terminal_snr:  # A1111's name and value for this noise schedule
        extra = {"Noise Schedule": "Zero Terminal SNR", "Timestep spacing": "trailing"}
    if result.guidance_rescale:
        extra["CFG Rescale"] = f"{result.guidance_rescale:g}"
    height, width = _image_size(image)
    return GenerationParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.steps,
        guidance_scale=req.guidance_scale,
        seed=result.seeds[index],
        width=width,
        height=height,
        scheduler=sampler,
        model=str(model),
        adapters=adapters,
        mode=req.mode,
        schedule_type=schedule,
        denoising_strength=req.strength if uses_strength else None,
        mask=Path(mask).name if isinstance(mask, (str, Path)) else ("image" if mask else ""),
        noise_level=req.noise_level if req.mode == "upscale" else None,
        dtype=str(pipe.unet.dtype).removeprefix("torch.")
        if pipe.unet.dtype != torch.float32
        else "",
        extra=extra,
    )


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or an (H, W, 3) array."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def save_result(
    pipe: Any,
    req: GenerationRequest,
    result: GenerationResult,
    out_dir: str | Path,
    model: str,
    adapters: list[tuple[str, float]],
) -> list[Path]:
    """PNGs per seed (with snapshot strips), and a grid for more than one image."""
    prefix = "" if req.mode == "txt2img" else f"{req.mode}-"
    paths = []
    for i, (seed, image) in enumerate(zip(result.seeds, result.images, strict=True)):
        params = build_generation_params(pipe, req, result, model, adapters, i)
        paths.append(save_png(image, out_dir, params, stem=f"{prefix}seed{seed}"))
        if result.snapshots and result.snapshots[i]:
            strip = make_strip([*result.snapshots[i], image])
            shown = {"Snapshots": ", ".join(f"{f:g}" for f in req.snapshots)}
            params = replace(params, extra={**params.extra, **shown})
            paths.append(save_png(strip, out_dir, params, stem=f"{prefix}seed{seed}-snapshots"))
    if len(result.images) > 1:
        first = build_generation_params(pipe, req, result, model, adapters, 0)
        stem = f"{prefix}grid-seed{result.seeds[0]}"
        paths.append(save_grid(result.images, out_dir, stem, first))
    return paths


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
    *,
    mode: str | None = None,
    seeds: list[int] | None = None,
    batch_size: int | None = None,
    speed: SpeedOptions | None = None,
    **request_fields: Any,
) -> list[Path]:
    """Load, generate and save; returns the written paths. `request_fields` are further
    `GenerationRequest` fields: image, mask, depth_map, strength, noise_level, scheduler,
    snapshots, max_token_length and zero_terminal_snr (default for both: what the first adapter
    was trained with), guidance_rescale. `mode`
    defaults to the family's first (txt2img; inpaint for inpainting models)."""
    from sdtune.models.families import detect_family

    adapters = adapters or []
    unknown = sorted(set(request_fields) - set(GenerationRequest.__dataclass_fields__))
    if unknown:
        raise TypeError(f"generate_to_folder() got unexpected arguments: {', '.join(unknown)}")
    all_seeds = seeds_for(seed, num_images, seeds)
    if request_fields.get("max_token_length") is None:
        request_fields["max_token_length"] = trained_max_token_length(adapters)
        if request_fields["max_token_length"] != 75:
            logger.info(
                "prompts encoded in windows up to %d tokens, as the adapter was trained",
                request_fields["max_token_length"],
            )
    if request_fields.get("zero_terminal_snr") is None:
        request_fields["zero_terminal_snr"] = trained_zero_terminal_snr(adapters)
        if request_fields["zero_terminal_snr"]:
            logger.info(
                "zero terminal SNR, as the adapter was trained: trailing timesteps and "
                "rescaled guidance (--no-zero-terminal-snr turns it off)"
            )
    req = GenerationRequest(
        prompt=prompt,
        mode=mode or "txt2img",
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        seeds=all_seeds,
        batch_size=batch_size or len(all_seeds),
        width=width,
        height=height,
        **request_fields,
    )
    for path, _ in adapters:
        resolve_adapter_path(path)  # a missing adapter fails before the model loads
    model = model or base_model_of(adapters)
    if mode is not None:
        _check_mode_before_loading(mode, str(model), family)
    speed = speed or SpeedOptions()
    if device is not None:
        speed = replace(speed, device=device)
    pipe = load_base(model, family, adapters, fuse, speed)
    if mode is None:
        req = replace(req, mode=default_mode(detect_family(pipe).name))
    result = generate(pipe, req)
    return save_result(pipe, req, result, out_dir, str(model), adapters)
