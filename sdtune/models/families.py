"""The Stable Diffusion 1.x/2.x and SDXL model families sdtune knows, and how to tell them apart.

Each family ships its full-size diffusers configs under `configs/<name>/` (as published in the
public model repos, without the safety checker), so an architecture can be built, a single-file
checkpoint converted, or a folder checked, without the network. Detection works from configs
only (never loads weights), so it is cheap enough to run before anything heavy.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.models.tokenizer import CONFIGS_DIR, write_tokenizer_folder

# Cross-attention widths of the real text encoders: CLIP ViT-L/14 (SD 1), OpenCLIP ViT-H (SD 2).
SD1_CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024
# SDXL: CLIP ViT-L (768) and OpenCLIP ViT-bigG (1280) hidden states side by side; the refiner
# attends to bigG alone.
SDXL_CONTEXT_DIM = 2048
SDXL_REFINER_CONTEXT_DIM = 1280
SDXL_POOLED_DIM = 1280  # OpenCLIP bigG's projection: the pooled text embedding of base and refiner
# SDXL's micro-conditioning ("time ids", Podell et al. 2023 sec. 2.2): original size, crop
# top-left and target size, each (height, width). The refiner replaces the target size with
# one aesthetic score, so its U-Net takes 5 ids.
SDXL_TIME_IDS = 6
SDXL_REFINER_TIME_IDS = 5
LATENT_CHANNELS = 4  # what the VAE of every family here encodes an image to

# The U-Net inputs a family concatenates to the noisy latents, (name, channels) in their order.
INPAINT_INPUTS = (("mask", 1), ("masked_image_latents", 4))
DEPTH_INPUTS = (("depth", 1),)
LOW_RES_INPUTS = (("low_res_image", 3),)  # the x4 upscaler's noised low-resolution RGB image


@dataclass(frozen=True)
class Family:
    """One model family: what it is, how diffusers runs it, and what tells it apart.

    Code that behaves differently per family asks these declared capabilities (its text
    encoders, the U-Net inputs beside the latents, micro-conditioning), never channel counts.
    """

    name: str  # public id, e.g. "sd1"
    description: str
    pipeline_class: str  # diffusers pipeline class name
    cross_attention_dim: int  # width of the text embeddings the U-Net attends to
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # native output side in pixels
    sd_version: int = 1  # 1: CLIP ViT-L text encoder; 2: OpenCLIP ViT-H text encoder
    text_encoders: tuple[str, ...] = ("text_encoder",)  # pipeline part names, in prompt order
    extra_inputs: tuple[tuple[str, int], ...] = ()  # (name, channels) after the latents
    micro_conditioning: bool = False  # U-Net conditioned on original size, crop and target size
    line: str = "sd1"  # the model line adapters are made for: "sd1", "sd2" or "sdxl"
    # Padding style of each text encoder's tokenizer, in `text_encoders` order: 1 pads with
    # <|endoftext|> (OpenAI CLIP), 2 with "!" (OpenCLIP). It changes the padded positions'
    # embeddings, so it must be the one the encoder was trained with.
    tokenizer_pads: tuple[int, ...] = (1,)
    trainable: bool = True  # False: a generation-only model (the SDXL refiner)

    @property
    def extra_in_channels(self) -> int:
        """U-Net input channels beyond the noisy latents (inpainting: mask 1 + masked image 4)."""
        return sum(channels for _, channels in self.extra_inputs)

    @property
    def unet_in_channels(self) -> int:
        """All the U-Net's input channels: the latents and the extra inputs."""
        return LATENT_CHANNELS + self.extra_in_channels

    @property
    def takes_inpaint_inputs(self) -> bool:
        """Whether the U-Net is fed a mask and the masked image's latents beside the latents."""
        return self.extra_inputs == INPAINT_INPUTS

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The pipeline's tokenizer part names, one per text encoder, in the same order."""
        return tuple(tokenizer_name(encoder) for encoder in self.text_encoders)

    @property
    def is_xl(self) -> bool:
        return self.line == "sdxl"

    @property
    def config_dir(self) -> Path:
        """The shipped folder of full-size diffusers configs (no weights, no tokenizer)."""
        return CONFIGS_DIR / self.name


def tokenizer_name(text_encoder: str) -> str:
    """The tokenizer part that feeds a text-encoder part: text_encoder_2 -> tokenizer_2."""
    return text_encoder.replace("text_encoder", "tokenizer")


def _family(name: str, description: str, pipeline: str, version: int, **kw) -> Family:
    context_dim = SD2_CONTEXT_DIM if version == 2 else SD1_CONTEXT_DIM
    return Family(
        name=name,
        description=description,
        pipeline_class=pipeline,
        cross_attention_dim=context_dim,
        prediction_type=kw.get("prediction_type", "epsilon"),
        resolution=kw.get("resolution", 512),
        sd_version=version,
        extra_inputs=kw.get("extra_inputs", ()),
        line=f"sd{version}",
        tokenizer_pads=(version,),
    )


def _xl_family(name: str, description: str, pipeline: str, **kw) -> Family:
    refiner = kw.get("refiner", False)
    return Family(
        name=name,
        description=description,
        pipeline_class=pipeline,
        cross_attention_dim=SDXL_REFINER_CONTEXT_DIM if refiner else SDXL_CONTEXT_DIM,
        prediction_type="epsilon",
        resolution=1024,
        sd_version=2 if refiner else 1,  # the first (or only) encoder's tokenizer padding
        text_encoders=("text_encoder_2",) if refiner else ("text_encoder", "text_encoder_2"),
        extra_inputs=kw.get("extra_inputs", ()),
        micro_conditioning=True,
        line="sdxl",
        tokenizer_pads=(2,) if refiner else (1, 2),
        trainable=not refiner,
    )


_TXT2IMG = "StableDiffusionPipeline"
_INPAINT = "StableDiffusionInpaintPipeline"
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _family("sd1", "Stable Diffusion 1.4/1.5, 512 px", _TXT2IMG, 1),
        _family(
            "sd1-inpaint",
            "SD 1.5 inpainting (9-channel U-Net)",
            _INPAINT,
            1,
            extra_inputs=INPAINT_INPUTS,
        ),
        _family("sd2-base", "Stable Diffusion 2.x base, 512 px, epsilon", _TXT2IMG, 2),
        _family(
            "sd2-v",
            "Stable Diffusion 2.x 768-v, v-prediction",
            _TXT2IMG,
            2,
            prediction_type="v_prediction",
            resolution=768,
        ),
        _family(
            "sd2-inpaint",
            "SD 2 inpainting (9-channel U-Net)",
            _INPAINT,
            2,
            extra_inputs=INPAINT_INPUTS,
        ),
        _family(
            "sd2-depth",
            "SD 2 depth-to-image (5-channel U-Net + DPT depth estimator)",
            "StableDiffusionDepth2ImgPipeline",
            2,
            extra_inputs=DEPTH_INPUTS,
        ),
        _family(
            "sd2-upscale",
            "SD x4 upscaler (7-channel U-Net, noise-level class embedding); 128 -> 512 px",
            "StableDiffusionUpscalePipeline",
            2,
            prediction_type="v_prediction",
            extra_inputs=LOW_RES_INPUTS,
        ),
        _xl_family("sdxl", "Stable Diffusion XL 1.0 base, 1024 px", "StableDiffusionXLPipeline"),
        _xl_family(
            "sdxl-inpaint",
            "SDXL 1.0 inpainting (9-channel U-Net)",
            "StableDiffusionXLInpaintPipeline",
            extra_inputs=INPAINT_INPUTS,
        ),
        _xl_family(
            "sdxl-refiner",
            "SDXL 1.0 refiner (second stage of generation; OpenCLIP bigG only)",
            "StableDiffusionXLImg2ImgPipeline",
            refiner=True,
        ),
    )
}


# The published base models of each family, by hub id (case as the hub spells them), so that
# what needs only the family (`sdtune estimate`, say) works before anything is downloaded.
KNOWN_HUB_MODELS: dict[str, str] = {
    "CompVis/stable-diffusion-v1-4": "sd1",
    "runwayml/stable-diffusion-v1-5": "sd1",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1",
    "runwayml/stable-diffusion-inpainting": "sd1-inpaint",
    "stable-diffusion-v1-5/stable-diffusion-inpainting": "sd1-inpaint",
    "stabilityai/stable-diffusion-2-base": "sd2-base",
    "stabilityai/stable-diffusion-2-1-base": "sd2-base",
    "stabilityai/stable-diffusion-2": "sd2-v",
    "stabilityai/stable-diffusion-2-1": "sd2-v",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-inpaint",
    "stabilityai/stable-diffusion-2-depth": "sd2-depth",
    "stabilityai/stable-diffusion-x4-upscaler": "sd2-upscale",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1": "sdxl-inpaint",
    "stabilityai/stable-diffusion-xl-refiner-1.0": "sdxl-refiner",
}


def known_hub_family(repo_id: str) -> str | None:
    """The family of a published base model's hub id (any letter case), or None."""
    lowered = {key.lower(): family for key, family in KNOWN_HUB_MODELS.items()}
    return lowered.get(str(repo_id).strip().rstrip("/").lower())


def get_family(name: str | Family) -> Family:
    """The family called `name`; a bad name is an error listing the valid ones."""
    if isinstance(name, Family):
        return name
    family = FAMILIES.get(name)
    if family is not None:
        return family
    valid = ", ".join(FAMILIES)
    starts = [f for f in FAMILIES if str(name) and f.startswith(str(name))]
    close = (starts or difflib.get_close_matches(str(name), list(FAMILIES), n=2, cutoff=0.5))[:2]
    hint = " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)" if close else ""
    raise SdtuneError(f"unknown model family '{name}'{hint}; valid families: {valid}")


def is_sd2_text(cross_attention_dim: int, use_linear_projection: bool) -> bool:
    """Whether a U-Net is conditioned on SD 2's OpenCLIP text rather than SD 1's CLIP.

    The real widths decide (768 vs 1024). Tiny test models use other widths; for them the
    transformer's input projection decides: SD 2 uses linear projections, SD 1 1x1 convolutions.
    """
    if cross_attention_dim == SD1_CONTEXT_DIM:
        return False
    if cross_attention_dim == SD2_CONTEXT_DIM:
        return True
    return bool(use_linear_projection)


def match_family(
    in_channels: int,
    sd2: bool,
    prediction_type: str,
    *,
    has_depth_estimator: bool = False,
    is_upscaler: bool = False,
    xl: str | None = None,
    source: str = "model",
) -> Family:
    """The family with these traits; an error if no family has them, or if the parts say one
    family and the U-Net's inputs another. `xl` is "base" or "refiner" for an SDXL U-Net."""
    extra = in_channels - LATENT_CHANNELS
    inpaint = extra == sum(c for _, c in INPAINT_INPUTS)
    if xl == "refiner":
        family = FAMILIES["sdxl-refiner"]
    elif xl is not None:
        family = FAMILIES["sdxl-inpaint" if inpaint else "sdxl"]
    elif is_upscaler or extra == sum(c for _, c in LOW_RES_INPUTS):
        family = FAMILIES["sd2-upscale"]
    elif has_depth_estimator or extra == sum(c for _, c in DEPTH_INPUTS):
        family = FAMILIES["sd2-depth"]
    elif inpaint:
        family = FAMILIES["sd2-inpaint" if sd2 else "sd1-inpaint"]
    elif extra == 0:
        if not sd2:
            family = FAMILIES["sd1"]
        else:
            family = FAMILIES["sd2-v" if prediction_type == "v_prediction" else "sd2-base"]
    else:
        counts = sorted({f.unet_in_channels for f in FAMILIES.values()})
        raise SdtuneError(
            f"{source}: U-Net with {in_channels} input channels is not a Stable Diffusion "
            f"1.x/2.x/XL family (expected {', '.join(map(str, counts[:-1]))} or {counts[-1]})"
        )
    if family.is_xl and prediction_type == "v_prediction":
        family = _with_prediction(family, prediction_type)
    check_unet_inputs(family, in_channels, source)
    return family


def _with_prediction(family: Family, prediction_type: str) -> Family:
    """An SDXL family whose checkpoint predicts v (community v-pred fine-tunes of SDXL)."""
    from dataclasses import replace

    return replace(family, prediction_type=prediction_type)


def xl_kind(unet_config: dict[str, Any]) -> str | None:
    """ "base", "refiner" or None (not SDXL), from a U-Net config alone.

    SDXL U-Nets add a "text_time" embedding: the pooled text embedding and the time ids. The
    base takes 6 ids and attends to both encoders; the refiner takes 5 ids (an aesthetic score
    in place of the target size) and attends to OpenCLIP bigG alone, whose width is then both
    the cross-attention width and the pooled width.
    """
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    per_id = int(unet_config.get("addition_time_embed_dim") or 0)
    total = int(unet_config.get("projection_class_embeddings_input_dim") or 0)
    context = int(unet_config.get("cross_attention_dim") or 0)
    return "refiner" if total - SDXL_REFINER_TIME_IDS * per_id == context else "base"


def describe_unet_inputs(family: Family) -> str:
    """The U-Net's inputs in words, e.g. '4 latent + 1 mask + 4 masked_image_latents = 9'."""
    parts = [f"{LATENT_CHANNELS} latent"] + [f"{c} {name}" for name, c in family.extra_inputs]
    return " + ".join(parts) + (f" = {family.unet_in_channels}" if family.extra_inputs else "")


def check_unet_inputs(family: Family, in_channels: int, source: str = "model") -> None:
    """An error naming both sides when a U-Net's input channels are not what `family` feeds."""
    if in_channels != family.unet_in_channels:
        raise SdtuneError(
            f"{source}: its U-Net takes {in_channels} input channels, but family "
            f"'{family.name}' feeds {describe_unet_inputs(family)}; "
            "check the model's U-Net config or choose the family that matches it"
        )


def detect_family(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline, from its U-Net/scheduler configs and parts."""
    if isinstance(pipe, (str, os.PathLike)):
        return detect_family_from_folder(pipe)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise SdtuneError(
            f"{type(pipe).__name__} has no U-Net; expected a Stable Diffusion pipeline"
        )
    config = dict(unet.config)
    source = type(pipe).__name__
    components = getattr(pipe, "components", {})
    return match_family(
        int(config["in_channels"]),
        is_sd2_text(int(config["cross_attention_dim"]), bool(config.get("use_linear_projection"))),
        pipe.scheduler.config.get("prediction_type", "epsilon"),
        has_depth_estimator=components.get("depth_estimator") is not None,
        is_upscaler=components.get("low_res_scheduler") is not None
        or config.get("num_class_embeds") is not None,
        xl=xl_kind(config),
        source=source,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdtuneError(f"{path} is missing; expected a diffusers model folder") from None
    except json.JSONDecodeError as exc:
        raise SdtuneError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def detect_family_from_folder(path: str | os.PathLike) -> Family:
    """The family of a diffusers model folder, from its JSON configs alone (no weights read)."""
    folder = Path(path)
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.exists() else {}

    def present(name: str) -> bool:
        value = index.get(name)
        return isinstance(value, list) and value[0] is not None

    return match_family(
        int(unet["in_channels"]),
        is_sd2_text(int(unet["cross_attention_dim"]), bool(unet.get("use_linear_projection"))),
        scheduler.get("prediction_type", "epsilon"),
        has_depth_estimator=present("depth_estimator"),
        is_upscaler=present("low_res_scheduler") or unet.get("num_class_embeds") is not None,
        xl=xl_kind(unet),
        source=str(folder),
    )


def write_config_folder(family: str | Family, dest: str | os.PathLike) -> Path:
    """Write a diffusers config folder (configs + tokenizer, no weights) for `family` at `dest`.

    This is what `from_single_file(config=...)` needs to build the pipeline offline.
    """
    family = get_family(family)
    dest = Path(dest)
    shutil.copytree(family.config_dir, dest, dirs_exist_ok=True)
    for name, pad in zip(family.tokenizers, family.tokenizer_pads, strict=True):
        write_tokenizer_folder(dest / name, pad)
    return dest


def build_pipeline_from_config(
    family: str | Family,
    components: dict[str, Any] | None = None,
    *,
    empty: bool = False,
    seed: int = 0,
) -> Any:
    """A full-size pipeline of `family` with random weights, built from the shipped configs.

    `components` replaces parts by name (e.g. a real `text_encoder`). With `empty=True` the
    weights live on the meta device: nothing is allocated, good for counting parameters or
    inspecting shapes, not for running. Otherwise this allocates the full model (~4-5 GB fp32).
    """
    from sdtune.models.build import build_pipeline, load_family_configs

    family = get_family(family)
    return build_pipeline(
        family, load_family_configs(family), components=components, empty=empty, seed=seed
    )
