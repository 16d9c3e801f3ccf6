"""Pure key maps from diffusers/transformers state dicts to the original (LDM/CompVis) layout.

The original layout is what A1111, ComfyUI and the Stability/CompVis repos read: one state dict
with `model.diffusion_model.*` (U-Net), `first_stage_model.*` (VAE) and `cond_stage_model.*`
(text encoder; SDXL: `conditioner.embedders.<i>.*`, one per text encoder). The U-Net and VAE maps are derived from the model's config (blocks, layers per
block, which blocks attend), so they hold for full-size and tiny models alike.

Layout notes, from the LDM sources:
- U-Net `input_blocks[0]` is conv_in; then per level `layers_per_block` blocks of
  [ResBlock, SpatialTransformer?] and, except on the last level, one Downsample block.
- `output_blocks` has `layers_per_block + 1` blocks per level of [ResBlock, SpatialTransformer?,
  Upsample?]: the upsampler's index inside the block depends on whether the level attends.
- The VAE decoder numbers its levels from the bottom (`up.3` is diffusers' `up_blocks.0`); its
  mid-block attention uses 1x1 convolutions where diffusers uses linear layers.
- SD 1's CLIP keeps Hugging Face names under `cond_stage_model.transformer.text_model.`;
  SD 2's OpenCLIP fuses q/k/v into one `in_proj` and has its own names.
- SDXL (Stability's `sgm` repo) keeps the same U-Net and VAE names, plus `label_emb.0.{0,2}` for
  the pooled-text + time-ids embedding; its CLIP ViT-L sits under `conditioner.embedders.0.
  transformer.text_model.` and OpenCLIP ViT-bigG under `conditioner.embedders.1.model.`, all
  32 blocks, with `text_projection` stored as the matrix OpenCLIP multiplies by (x @ P): the
  transpose of Hugging Face's `text_projection.weight`. The refiner has bigG alone, as embedder 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sdtune.errors import SdtuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
XL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
XL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

# (diffusers module prefix, original module prefix, renames of the module's own children)
PrefixMap = list[tuple[str, str, Mapping[str, str]]]


def unet_prefix_map(config: Mapping[str, Any]) -> PrefixMap:
    """Module prefixes of a diffusers UNet2DConditionModel and their LDM `UNetModel` names."""
    per_level = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    pairs: PrefixMap = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("class_embedding.", "label_emb.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}),  # SDXL: pooled text + time ids
        ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for level in range(levels):
        for j in range(per_level):
            block = 1 + level * (per_level + 1) + j
            pairs.append(
                (f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0.", _UNET_RESNET)
            )
            pairs.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
        if level < levels - 1:
            block = 1 + level * (per_level + 1) + per_level
            pairs.append(
                (f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", {})
            )
        for j in range(per_level + 1):
            block = level * (per_level + 1) + j
            pairs.append(
                (f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0.", _UNET_RESNET)
            )
            pairs.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
        if level < levels - 1:
            block = level * (per_level + 1) + per_level
            slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
            pairs.append(
                (f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{block}.{slot}.conv.", {})
            )
    return pairs


def vae_prefix_map(config: Mapping[str, Any]) -> PrefixMap:
    """Module prefixes of a diffusers AutoencoderKL and their LDM `AutoencoderKL` names."""
    per_level = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    pairs: PrefixMap = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION),
        ]
    for level in range(levels):
        for j in range(per_level):
            pairs.append(
                (
                    f"encoder.down_blocks.{level}.resnets.{j}.",
                    f"encoder.down.{level}.block.{j}.",
                    _VAE_RESNET,
                )
            )
        pairs.append(
            (
                f"encoder.down_blocks.{level}.downsamplers.0.",
                f"encoder.down.{level}.downsample.",
                {},
            )
        )
        original = levels - 1 - level  # the decoder counts levels from the bottom
        for j in range(per_level + 1):
            pairs.append(
                (
                    f"decoder.up_blocks.{level}.resnets.{j}.",
                    f"decoder.up.{original}.block.{j}.",
                    _VAE_RESNET,
                )
            )
        pairs.append(
            (f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{original}.upsample.", {})
        )
    return pairs


def rename_keys(keys: Iterable[str], prefix_map: PrefixMap, what: str) -> dict[str, str]:
    """Map each key to its original name: the longest matching module prefix, then child renames."""
    ordered = sorted(prefix_map, key=lambda entry: len(entry[0]), reverse=True)
    renamed = {}
    for key in keys:
        for src, dst, children in ordered:
            if key.startswith(src):
                rest = key[len(src) :]
                for child, original in children.items():
                    if rest.startswith(child + "."):
                        rest = original + rest[len(child) :]
                        break
                renamed[key] = dst + rest
                break
        else:
            raise SdtuneError(
                f"{what} weight '{key}' has no original-layout name (not SD 1.x/2.x/XL?)"
            )
    return renamed


def _check_plain(state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights with live adapters: their keys would be exported under the wrong names."""
    for key in state_dict:
        if ".base_layer." in key or ".lora_" in key:
            raise SdtuneError(
                f"{what} has unfused LoRA layers ('{key}'); call pipe.fuse_lora() and "
                "pipe.unload_lora_weights() before exporting a single-file checkpoint"
            )


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers U-Net state dict in LDM layout, prefixed `model.diffusion_model.`."""
    _check_plain(state_dict, "U-Net")
    names = rename_keys(state_dict, unet_prefix_map(config), "U-Net")
    return {UNET_PREFIX + names[k]: v for k, v in state_dict.items()}


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """A diffusers VAE state dict in LDM layout, prefixed `first_stage_model.`.

    The mid-block attention's linear q/k/v/out weights become 1x1 convolution kernels.
    """
    _check_plain(state_dict, "VAE")
    names = rename_keys(state_dict, vae_prefix_map(config), "VAE")
    out = {}
    for key, value in state_dict.items():
        name = names[key]
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value
    return out


def _text_key(key: str) -> str:
    # transformers 5 dropped the `text_model.` level of CLIPTextModel; older versions have it.
    return key.removeprefix("text_model.")


def clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_PREFIX) -> dict:
    """CLIP ViT-L in original layout: Hugging Face names under `prefix` (SD 1's by default)."""
    _check_plain(state_dict, "text encoder")
    return {
        prefix + _text_key(k): v for k, v in state_dict.items() if not k.endswith("position_ids")
    }


def openclip_to_original(
    state_dict: Mapping[str, torch.Tensor], pad_to_layers: int = 0, prefix: str = OPENCLIP_PREFIX
) -> dict:
    """An OpenCLIP text encoder in its own layout under `prefix` (SD 2's by default), q/k/v fused.

    A `CLIPTextModelWithProjection` (SDXL's bigG) keeps every block, and its projection is
    written as OpenCLIP's `text_projection` matrix (the transpose of the linear layer's weight).
    For SD 2, diffusers keeps 23 of OpenCLIP ViT-H's 24 blocks (SD 2 reads the penultimate
    block's output) and drops `text_projection`. With `pad_to_layers` (24 for real SD 2) the
    missing last block is written as a copy of the final one and `text_projection` as the
    identity, so tools that build the full OpenCLIP model find every weight; SD 2 never runs
    either.
    """
    _check_plain(state_dict, "text encoder")
    sd = {_text_key(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    projection = sd.pop("text_projection.weight", None)
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
        for name in [k for k in sd if k.startswith(src)]:
            rest = name[len(src) :]
            for hf, oc in _OPENCLIP_LAYER.items():
                if rest.startswith(hf + "."):
                    out[dst + oc + rest[len(hf) :]] = sd.pop(name)
                    break
    if sd:
        raise SdtuneError(f"text encoder weight '{next(iter(sd))}' has no OpenCLIP name")
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    elif pad_to_layers and layers and len(layers) < pad_to_layers:
        last = f"transformer.resblocks.{layers[-1]}."
        for i in range(len(layers), pad_to_layers):
            for name in [k for k in out if k.startswith(last)]:
                out[f"transformer.resblocks.{i}." + name[len(last) :]] = out[name].clone()
        width = out["ln_final.weight"].shape[0]
        out["text_projection"] = torch.eye(width, dtype=out["ln_final.weight"].dtype)
    return {prefix + k: v for k, v in out.items()}
