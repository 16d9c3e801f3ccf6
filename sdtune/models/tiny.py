"""Tiny random models of every family, built from config in-process, for tests and examples.

Each tiny model is the family's shipped full-size config with small widths: the same block
types, input channels, prediction type, class embedding, projection kind, scheduler and the real
49,408-token tokenizer, so code that works on a tiny model meets the same structure as on the
real one. Sizes: U-Net ~1.4 M parameters, VAE ~1.0 M with the real number of downsamplings (3;
the upscaler's 2), text encoder of width 32 (~1.6 M, mostly the token embedding). One family
builds in well under a second on a CPU; the same seed gives the same weights in any process.
"""

from __future__ import annotations

import copy
from typing import Any

from sdtune.models.build import build_pipeline, load_family_configs
from sdtune.models.families import SDXL_POOLED_DIM, Family, get_family

TINY_RESOLUTION = 64  # output side in pixels of tiny txt2img/inpaint/depth models
TINY_UPSCALER_INPUT = 32  # low-res input side of the tiny x4 upscaler (output 128)
TINY_TEXT_WIDTH = 32

_UNET_CHANNELS = [16, 32, 32, 64]
_VAE_CHANNELS = [16, 32, 32, 64]
_NORM_GROUPS = 8
_HEAD_DIM = 8  # channels per attention head where the real config lists heads per block
_TIME_ID_WIDTH = 8  # SDXL: width of each micro-conditioning id's sinusoidal embedding (real: 256)
_MAX_TRANSFORMER_LAYERS = 2  # SDXL stacks 10 transformer blocks at its deepest level


def tiny_unet_config(full: dict[str, Any], family: Family) -> dict[str, Any]:
    """The full-size U-Net config with tiny widths and everything structural kept."""
    cfg = copy.deepcopy(full)
    blocks = len(cfg["block_out_channels"])
    channels = _UNET_CHANNELS[:blocks]
    heads = cfg["attention_head_dim"]
    if isinstance(heads, list):  # SD 2 lists heads per block: keep the head width constant
        heads = [max(1, c // _HEAD_DIM) for c in channels]
    else:
        heads = 4
    latent_side = TINY_UPSCALER_INPUT if family.name == "sd2-upscale" else TINY_RESOLUTION // 8
    cfg.update(
        block_out_channels=channels,
        attention_head_dim=heads,
        cross_attention_dim=TINY_TEXT_WIDTH * len(family.text_encoders),
        norm_num_groups=_NORM_GROUPS,
        sample_size=latent_side,
    )
    if family.micro_conditioning:  # the pooled text (bigG's projection) + sinusoidal time ids
        layers = cfg["transformer_layers_per_block"]
        if isinstance(layers, list):
            layers = [min(n, _MAX_TRANSFORMER_LAYERS) for n in layers]
        else:
            layers = min(int(layers), _MAX_TRANSFORMER_LAYERS)
        full_ids = full["projection_class_embeddings_input_dim"] - SDXL_POOLED_DIM
        ids = full_ids // full["addition_time_embed_dim"]
        cfg.update(
            transformer_layers_per_block=layers,
            addition_time_embed_dim=_TIME_ID_WIDTH,
            projection_class_embeddings_input_dim=ids * _TIME_ID_WIDTH + TINY_TEXT_WIDTH,
        )
    return cfg


def tiny_vae_config(full: dict[str, Any]) -> dict[str, Any]:
    """The full-size VAE config with tiny widths; the number of downsamplings is kept."""
    cfg = copy.deepcopy(full)
    blocks = len(cfg["block_out_channels"])
    cfg.update(
        block_out_channels=_VAE_CHANNELS[:blocks],
        norm_num_groups=_NORM_GROUPS,
        sample_size=TINY_RESOLUTION * (2 if blocks == 3 else 1),
    )
    return cfg


def tiny_text_encoder_config(full: dict[str, Any]) -> dict[str, Any]:
    """The family's CLIP text config (activation, vocabulary) with width 32 and 2 layers."""
    cfg = copy.deepcopy(full)
    cfg.update(
        hidden_size=TINY_TEXT_WIDTH,
        intermediate_size=2 * TINY_TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=TINY_TEXT_WIDTH,
    )
    return cfg


def tiny_depth_configs() -> tuple[dict[str, Any], dict[str, Any]]:
    """A ~130k-parameter DPT depth estimator (plain ViT, not hybrid) and its 32 px processor."""
    dpt = {
        "architectures": ["DPTForDepthEstimation"],
        "model_type": "dpt",
        "is_hybrid": False,
        "image_size": 32,
        "patch_size": 8,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "backbone_out_indices": [0, 1, 2, 3],
        "neck_hidden_sizes": [8, 16, 32, 32],
        "reassemble_factors": [4, 2, 1, 0.5],
        "fusion_hidden_size": 16,
        "readout_type": "project",
        "head_in_index": -1,
    }
    processor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "ensure_multiple_of": 1,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "keep_aspect_ratio": False,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": 32, "width": 32},
    }
    return dpt, processor


def tiny_family_configs(family: str | Family) -> dict[str, dict[str, Any]]:
    """All config dicts of the tiny version of `family` (what `build_tiny_pipeline` builds)."""
    family = get_family(family)
    configs = load_family_configs(family)
    configs["unet"] = tiny_unet_config(configs["unet"], family)
    configs["vae"] = tiny_vae_config(configs["vae"])
    for name in family.text_encoders:
        configs[name] = tiny_text_encoder_config(configs[name])
    index = configs["model_index"]
    if "depth_estimator" in configs:
        configs["depth_estimator"], configs["feature_extractor"] = tiny_depth_configs()
    elif "feature_extractor" in index:
        # Only a safety checker would use SD 1's CLIP image processor; tiny models have none.
        index["feature_extractor"] = [None, None]
    return configs


def build_tiny_pipeline(family: str = "sd1", seed: int = 0) -> Any:
    """A tiny random pipeline of `family` (CPU, fp32), the same for a given seed in any process.

    Its pipeline class is the family's (txt2img, inpainting, depth-to-image or x4 upscaling).
    `save_pretrained` + the class's `from_pretrained` round-trips it exactly.
    """
    fam = get_family(family)
    return build_pipeline(fam, tiny_family_configs(fam), seed=seed)
