"""Generate to a folder: load the base and adapters, draw in any mode, write PNGs with their
parameters. `generate` is the in-memory API over an already loaded pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdtune.adapters.io import read_adapter_metadata, resolve_adapter_path
from sdtune.errors import SdtuneError
from sdtune.generate.device import compile_unet, pick_device, pick_dtype, place_pipeline
from sdtune.generate.engine import GenerationResult, mode_pipeline, run_request
from sdtune.generate.modes import get_mode
from sdtune.generate.outputs import GenerationParams, save_grid, save_png
from sdtune.generate.request import (
    GenerationJob,
    GenerationRequest,
    SpeedOptions,
    prepare_request,
    resolve_request,
)
from sdtune.generate.schema import build_generation_job
from sdtune.generate.snapshots import make_strip
from sdtune.generate.txt2img import load_adapters

__all__ = [
    "GenerationJob",
    "GenerationRequest",
    "SpeedOptions",
    "build_generation_job",
    "generate",
    "generate_to_folder",
    "load_base",
    "pick_device",
]

logger = logging.getLogger("sdtune.generate")


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


def _first_said(adapters: list[tuple[str, float]], key: str, values: tuple[str, ...]):
    """The first of `values` an sdtune adapter's header gives for `key`, or None."""
    for path, _ in adapters:
        value = read_adapter_metadata(resolve_adapter_path(path)).get(key)
        if value in values:
            return value
    return None


def trained_zero_terminal_snr(adapters: list[tuple[str, float]]) -> bool:
    """Whether the first sdtune adapter that says so was trained with zero terminal SNR."""
    return _first_said(adapters, "zero_terminal_snr", ("true", "false")) == "true"


def trained_prediction_type(adapters: list[tuple[str, float]]) -> str | None:
    """What the first sdtune adapter that says so was trained to predict, or None."""
    return _first_said(adapters, "prediction_type", ("epsilon", "v_prediction"))


def _folder_family(model: str | None, family: str | None) -> str | None:
    """The given family, or a diffusers folder's (read from its configs alone), or None."""
    from sdtune.models.families import detect_family_from_folder

    if family is not None:
        return family
    if model is not None and Path(model, "model_index.json").is_file():
        return detect_family_from_folder(model).name
    return None


def _check_before_loading(job: GenerationJob, mode: str | None, model: str) -> None:
    """A bad mode, one the model's family cannot run, or a refiner that cannot follow the
    model, fails before the weights load (a folder's family is read from its configs)."""
    from sdtune.generate.modes import check_mode_fits

    base = _folder_family(model, job.family)
    if mode is not None and base is not None:
        check_mode_fits(get_mode(mode), base)
    elif mode is not None:
        get_mode(mode)
    if job.refiner is not None:
        from sdtune.generate.refiner import check_refiner_families

        if base is not None:
            check_refiner_families(base, _folder_family(job.refiner, None))


def load_refiner(model: str, speed: SpeedOptions | None = None, base: Any = None) -> Any:
    """An SDXL refiner pipeline, placed as `load_base` places the base. Parts with the same
    weights as `base`'s (the published refiner's VAE and OpenCLIP bigG are the base's) are the
    base's own modules, so they are held once (not with --cpu-offload, whose hooks are per
    pipeline); a base part a live or fused adapter changed differs, and stays apart."""
    from sdtune.models.loading import load_pipeline

    speed = speed or SpeedOptions()
    device = pick_device(speed.device)
    dtype = pick_dtype(device, speed.dtype)
    pipe = load_pipeline(model, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if base is not None and not speed.cpu_offload:
        pipe = _share_parts(pipe, base)
    place_pipeline(
        pipe, device, dtype, channels_last=speed.channels_last, cpu_offload=speed.cpu_offload
    )
    return pipe


def _share_parts(refiner: Any, base: Any) -> Any:
    """`refiner` with each of its VAE and text_encoder_2 replaced by `base`'s where the two hold
    the same tensors, compared in the refiner's precision (the base's VAE may have been kept in
    fp32 where the refiner's was just loaded in fp16; placing it would upcast it too)."""
    shared = {}
    for part in ("vae", "text_encoder_2"):
        mine, theirs = getattr(refiner, part, None), getattr(base, part, None)
        if mine is None or theirs is None or type(mine) is not type(theirs):
            continue
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].to(a[k].dtype).cpu())
            for k in a
        ):
            shared[part] = theirs
    if not shared:
        return refiner
    logger.info("the refiner uses the base's %s (the same weights)", " and ".join(shared))
    pipe = type(refiner).from_pipe(refiner, **shared)  # keeps requires_aesthetics_score
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, request: GenerationRequest, refiner: Any = None) -> GenerationResult:
    """Run `request` on a loaded pipeline of any family, in the request's mode; with an SDXL
    `refiner` pipeline, the refiner draws the run's last part (sdtune.generate.refiner).

    The caller's pipelines are not changed: another mode or scheduler runs on a view sharing
    their weights (and adapters). Same seed and settings give the same image on the same device.
    """
    from sdtune.models.families import detect_family

    family = detect_family(pipe).name
    request = prepare_request(request, family)
    if refiner is not None:
        from sdtune.generate.refiner import check_refiner_request

        check_refiner_request(request, family, detect_family(refiner).name)
        refiner = _with_sampler(refiner, request)
    target = _with_sampler(mode_pipeline(pipe, request.mode_spec, family), request)
    return run_request(target, request, refiner)


def _with_sampler(pipe: Any, request: GenerationRequest) -> Any:
    """`pipe`, or a view of it with the request's scheduler and noise schedule."""
    own = pipe.scheduler.config.get("prediction_type")
    other_prediction = request.prediction_type not in (None, own)
    if request.scheduler is None and not request.zero_terminal_snr and not other_prediction:
        return pipe
    from sdtune.generate.schedulers import set_scheduler, use_zero_terminal_snr

    target = type(pipe).from_pipe(pipe)
    target.set_progress_bar_config(disable=True)
    if request.scheduler is not None:
        set_scheduler(target, request.scheduler)
    if other_prediction:
        config = target.scheduler.config
        target.scheduler = type(target.scheduler).from_config(
            config, prediction_type=request.prediction_type
        )
    if request.zero_terminal_snr:
        use_zero_terminal_snr(target, request.scheduler)
    return target


def load_base(
    model: str,
    family: str | None = None,
    adapters: list[tuple[str, float]] | None = None,
    fuse: bool = False,
    speed: SpeedOptions | None = None,
    config_dir: str | None = None,
) -> Any:
    """The base pipeline with adapters loaded (live, or fused), placed for speed."""
    from sdtune.models.loading import load_pipeline

    speed = speed or SpeedOptions()
    device = pick_device(speed.device)
    dtype = pick_dtype(device, speed.dtype)
    pipe = load_pipeline(model, family=family, torch_dtype=dtype, config_dir=config_dir)
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
    refiner: str | None = None,
) -> GenerationParams:
    """The PNG parameters of image `index` of `result`, drawn by `generate(pipe, req)` (and
    the `refiner` model, in A1111's names "Refiner" and "Refiner switch at")."""
    from sdtune.generate.schedulers import a1111_name_of

    sampler, schedule = a1111_name_of(result.scheduler or pipe.scheduler)
    req = resolve_request(replace(req, mode=req.mode or result.mode))
    image = result.images[index]
    uses_strength = "strength" in dict(req.mode_spec.arguments)
    mask, extra = req.mask, {}
    if req.zero_terminal_snr:  # A1111's name and value for this noise schedule
        extra = {"Noise Schedule": "Zero Terminal SNR", "Timestep spacing": "trailing"}
    if result.guidance_rescale:
        extra["CFG Rescale"] = f"{result.guidance_rescale:g}"
    for name, label in (("original_size", "Original size"), ("target_size", "Target size")):
        if getattr(req, name):  # SDXL's size conditioning, where it is not the output's size
            extra[label] = "x".join(map(str, getattr(req, name)))
    if req.crop_top_left:
        extra["Crop top left"] = ",".join(map(str, req.crop_top_left))
    if result.refiner_start is not None:
        extra["Refiner"] = str(refiner or "refiner")
        extra["Refiner switch at"] = f"{result.refiner_start:g}"
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
    refiner: str | None = None,
) -> list[Path]:
    """PNGs per seed (with snapshot strips), and a grid for more than one image; `refiner`
    names the refiner model of a two-stage run."""
    mode = req.mode or result.mode
    prefix = "" if mode == "txt2img" else f"{mode}-"
    paths = []
    for i, (seed, image) in enumerate(zip(result.seeds, result.images, strict=True)):
        params = build_generation_params(pipe, req, result, model, adapters, i, refiner)
        paths.append(save_png(image, out_dir, params, stem=f"{prefix}seed{seed}"))
        if result.snapshots and result.snapshots[i]:
            strip = make_strip([*result.snapshots[i], image])
            shown = {"Snapshots": ", ".join(f"{f:g}" for f in req.snapshots)}
            params = replace(params, extra={**params.extra, **shown})
            paths.append(save_png(strip, out_dir, params, stem=f"{prefix}seed{seed}-snapshots"))
    if len(result.images) > 1:
        first = build_generation_params(pipe, req, result, model, adapters, 0, refiner)
        stem = f"{prefix}grid-seed{result.seeds[0]}"
        paths.append(save_grid(result.images, out_dir, stem, first))
    return paths


def _settings_from_adapters(req: GenerationRequest, adapters: list) -> GenerationRequest:
    """Options left unset that the first adapter's training settles: the prompt length, what
    the U-Net predicts and zero terminal SNR, so prompts, sampler and noise schedule match what
    the adapter learned."""
    updates: dict[str, Any] = {}
    if req.max_token_length is None:
        updates["max_token_length"] = trained_max_token_length(adapters)
        if updates["max_token_length"] != 75:
            logger.info(
                "prompts encoded in windows up to %d tokens, as the adapter was trained",
                updates["max_token_length"],
            )
    if req.prediction_type is None:
        updates["prediction_type"] = trained_prediction_type(adapters)
    if req.zero_terminal_snr is None:
        updates["zero_terminal_snr"] = trained_zero_terminal_snr(adapters)
        if updates["zero_terminal_snr"]:
            logger.info(
                "zero terminal SNR, as the adapter was trained: trailing timesteps and "
                "rescaled guidance (--no-zero-terminal-snr turns it off)"
            )
    return replace(req, **updates)


def generate_to_folder(job: GenerationJob) -> list[Path]:
    """Load the job's model and adapters, generate and save; returns the written paths.

    Build the job from option values with `build_generation_job` (which checks them all
    first). Options left unset follow the model (the mode: the family's first, txt2img or
    inpaint) or the first adapter (prompt length, zero terminal SNR)."""
    from sdtune.models.families import detect_family

    adapters = job.lora
    for path, _ in adapters:
        resolve_adapter_path(path)  # a missing adapter fails before the model loads
    req = _settings_from_adapters(job.request, adapters)
    model = job.model or base_model_of(adapters)
    _check_before_loading(job, req.mode, str(model))
    pipe = load_base(model, job.family, adapters, job.fuse, job.speed, job.config_dir)
    family = detect_family(pipe).name
    req = resolve_request(req, family)
    if job.refiner is not None:  # before the refiner's weights load
        from sdtune.generate.refiner import check_refiner_families

        check_refiner_families(family, None)
    refiner = load_refiner(job.refiner, job.speed, pipe) if job.refiner is not None else None
    result = generate(pipe, req, refiner)
    return save_result(pipe, req, result, job.out, str(model), adapters, job.refiner)
