"""The one path every mode runs through: the mode's pipeline, seeds in batches, snapshots.

The base model is loaded once; `mode_pipeline` gives the pipeline of another mode over the
same weights (diffusers' `from_pipe`), so adapters loaded on the base apply in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from sdtune.generate.modes import Mode
from sdtune.generate.request import GenerationRequest, resolve_request
from sdtune.generate.snapshots import SnapshotRecorder


@dataclass
class GenerationResult:
    """Images in seed order; per image, its snapshots (empty lists if none were asked for)."""

    images: list[Any]  # PIL images, or (H, W, 3) float arrays with output_type="np"
    seeds: list[int]
    snapshots: list[list[Image.Image]] = field(default_factory=list)
    scheduler: Any = None  # the scheduler that drew them (named in the PNG text)
    guidance_rescale: float = 0.0  # applied, where the mode's pipeline takes it
    mode: str = "txt2img"  # the mode that drew them (a request may leave it to the model)
    refiner_start: float | None = None  # where a refiner took over, if one did


def mode_pipeline(pipe: Any, mode: Mode, family: str | None = None) -> Any:
    """`pipe` itself if it already is the mode's pipeline, else one sharing its components
    (the mode's SD 1/2 or SDXL pipeline, by the family of `pipe` when none is given)."""
    import diffusers

    from sdtune.models.families import detect_family

    class_name = mode.pipeline_class_for(family or detect_family(pipe).name)
    if type(pipe).__name__ == class_name:
        return pipe
    cls = getattr(diffusers, class_name)
    new = cls.from_pipe(pipe)
    new.set_progress_bar_config(disable=True)
    return new


def generator_device(pipe: Any) -> str:
    """Where seeds are drawn: the pipeline's device (CPU under MPS or model offload).

    Drawing on the device keeps CUDA runs reproducible on CUDA; the same seed gives the same
    image on the same device kind, not across devices.
    """
    device = getattr(pipe, "_execution_device", None) or pipe.device
    return "cpu" if torch.device(device).type in ("mps", "meta") else str(device)


def _pipeline_kwargs(pipe: Any, req: GenerationRequest, seeds: list[int]) -> dict[str, Any]:
    """Keyword arguments of one pipeline call for the images of `seeds`.

    Prompts and input images are repeated per image rather than passed once with
    `num_images_per_prompt`: the pipelines then draw every random number of item i (VAE
    sample, image noise, initial latents) from generator i alone, so an image does not depend
    on which other seeds share its batch.
    """
    device = generator_device(pipe)
    n = len(seeds)
    kwargs: dict[str, Any] = {
        "prompt": [req.prompt] * n,
        "negative_prompt": [req.negative_prompt] * n if req.negative_prompt else None,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance_scale,
        "generator": [torch.Generator(device).manual_seed(s) for s in seeds],
        "output_type": req.output_type,
    }
    for field_name, keyword in req.mode_spec.arguments:
        value = getattr(req, field_name)
        if isinstance(value, Image.Image):
            value = [value] * n
        if value is not None:
            kwargs[keyword] = value
    if req.effective_guidance_rescale and takes_guidance_rescale(pipe):
        kwargs["guidance_rescale"] = req.effective_guidance_rescale
    if req.mode == "inpaint":  # inpainting defaults to the U-Net's size, not the image's
        kwargs["width"], kwargs["height"] = req.image.size
    if is_xl_pipeline(pipe):  # both text encoders and the pooled embedding, as in training
        kwargs.update(xl_prompt_kwargs(pipe, req, n))
        kwargs.update(xl_conditioning_kwargs(pipe, req))
        kwargs["prompt"] = kwargs["negative_prompt"] = None
    elif req.max_token_length > 75:  # long prompts: encoded in windows, the way training did
        from sdtune.data.prompts import encode_prompt_embeds

        kwargs["prompt_embeds"], kwargs["negative_prompt_embeds"] = encode_prompt_embeds(
            pipe, [req.prompt] * n, [req.negative_prompt] * n, req.max_token_length
        )
        kwargs["prompt"] = kwargs["negative_prompt"] = None
    return kwargs


def is_xl_pipeline(pipe: Any) -> bool:
    """Whether `pipe` is one of diffusers' SDXL pipelines (base, inpainting or refiner)."""
    from sdtune.models.families import detect_family

    return detect_family(pipe).is_xl


def xl_conditioning_kwargs(pipe: Any, req: GenerationRequest) -> dict[str, Any]:
    """SDXL's size and crop conditioning in diffusers' (height, width) and (top, left) order,
    where the request gives them; and the aesthetic scores, for a pipeline that reads them (the
    refiner's). Left out, diffusers uses the output's size, no crop, and scores 6 and 2.5."""
    out: dict[str, Any] = {}
    if req.original_size:
        out["original_size"] = (req.original_size[1], req.original_size[0])
    if req.target_size:
        out["target_size"] = (req.target_size[1], req.target_size[0])
    if req.crop_top_left:
        out["crops_coords_top_left"] = (req.crop_top_left[1], req.crop_top_left[0])
    if getattr(pipe.config, "requires_aesthetics_score", False):
        out["aesthetic_score"] = req.aesthetic_score
        out["negative_aesthetic_score"] = req.negative_aesthetic_score
    return out


def xl_prompt_kwargs(pipe: Any, req: GenerationRequest, n: int) -> dict[str, torch.Tensor]:
    """The SDXL pipeline's four prompt tensors for `n` images, in the windows of
    `req.max_token_length` (sdtune.data.prompts, the same encoding as training).

    An empty negative prompt is all zeros where the model says so
    (`force_zeros_for_empty_prompt`: SDXL base and inpainting, not the refiner), as diffusers
    does when no negative prompt is given; the micro-conditioning is left to the pipeline,
    whose defaults are diffusers' (original and target size the output's, crop at 0, 0).
    """
    from sdtune.data.prompts import Conditioning, encode_prompt_conditioning

    cond, negative = encode_prompt_conditioning(
        pipe, [req.prompt] * n, [req.negative_prompt] * n, req.max_token_length
    )
    if not req.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
        negative = Conditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled))
    return {
        "prompt_embeds": cond.embeds,
        "pooled_prompt_embeds": cond.pooled,
        "negative_prompt_embeds": negative.embeds,
        "negative_pooled_prompt_embeds": negative.pooled,
    }


def takes_guidance_rescale(pipe: Any) -> bool:
    """Whether the pipeline rescales guidance (diffusers' text-to-image pipeline does)."""
    import inspect

    return "guidance_rescale" in inspect.signature(type(pipe).__call__).parameters


def _with_snapshots(pipe: Any, kwargs: dict, recorder: SnapshotRecorder) -> dict:
    if type(pipe).__name__ == "StableDiffusionUpscalePipeline":  # only the legacy callback
        return {**kwargs, "callback": recorder.legacy_callback(pipe), "callback_steps": 1}
    return {**kwargs, "callback_on_step_end": recorder.on_step_end}


@torch.no_grad()
def run_request(pipe: Any, req: GenerationRequest, refiner: Any = None) -> GenerationResult:
    """Draw the request's images with a pipeline already in its mode (see `mode_pipeline`);
    with an SDXL `refiner` (checked by sdtune.generate.refiner), as two stages."""
    req = resolve_request(req)
    images: list[Any] = []
    snapshots: list[list[Image.Image]] = []
    for start in range(0, len(req.seeds), req.batch_size):
        seeds = req.seeds[start : start + req.batch_size]
        kwargs = _pipeline_kwargs(pipe, req, seeds)
        recorder = SnapshotRecorder(req.snapshots)
        if req.snapshots:
            kwargs = _with_snapshots(pipe, kwargs, recorder)
        if refiner is None:
            images.extend(list(pipe(**kwargs).images))
        else:
            from sdtune.generate.refiner import run_two_stages

            images.extend(run_two_stages(pipe, refiner, req, kwargs))
        snapshots.extend(recorder.decode(pipe) or [[] for _ in seeds])
    rescale = req.effective_guidance_rescale if takes_guidance_rescale(pipe) else 0.0
    return GenerationResult(
        list(images),
        list(req.seeds),
        snapshots,
        pipe.scheduler,
        rescale,
        req.mode,
        req.refiner_start if refiner is not None else None,
    )
