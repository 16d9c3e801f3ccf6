"""Which keys of a LoRA file AUTOMATIC1111 and ComfyUI would apply, by their own matching rules.

These are re-statements of the two UIs' public key-matching rules for SD 1/2 and SDXL models, written
from their sources and kept apart from sdtune's exporter (`formats.kohya_name`), so that one
checks the other. They work on the raw keys of the file and on the model's weights in the
original (LDM) layout, which is what both UIs load.

AUTOMATIC1111 (`extensions-builtin/Lora/networks.py`):
- a key is split at its first dot into a network name and a tensor name;
- `convert_diffusers_name_to_compvis` rewrites `lora_unet_<diffusers path>` names by fixed
  rules (down block d, item i -> `input_blocks_{1 + 3d + i}`, up block u, item i ->
  `output_blocks_{3u + i}`, attention -> `_1_`, ResNet -> `_0_` with conv1 -> `in_layers_2`,
  conv2 -> `out_layers_3`, time_emb_proj -> `emb_layers_1`, conv_shortcut -> `skip_connection`;
  samplers, conv_in/out and the time embedding by their own rules) and
  `lora_te_text_model_encoder_layers_<n>_<rest>` to the CLIP module name (SD 1) or to the
  OpenCLIP one (SD 2: `model_transformer_resblocks_<n>`, mlp_fc1 -> mlp_c_fc, mlp_fc2 ->
  mlp_c_proj, self_attn -> attn);
- the name must then be a module of the loaded model, named with `_` for `.`; failing that,
  a `_q_proj/_k_proj/_v_proj` name falls back to its parent (SD 2's fused attention, which is
  patched only when q, k, v and out_proj of that layer are all in the file), and a
  `lora_unet_` name is tried as `diffusion_model_` + the rest (files already in LDM names);
- a module is LoRA when it has `lora_up.weight` and `lora_down.weight`; its scale is
  `alpha / rank` with alpha from the `.alpha` tensor (1 without one); everything else is
  "Failed to match keys".

ComfyUI (`comfy/lora.py` `model_lora_keys_unet` / `model_lora_keys_clip`, `comfy/utils.py`
`unet_to_diffusers`, `comfy/weight_adapter/lora.py`; Forge loads LoRA through the same code):
- U-Net: every LDM weight `diffusion_model.<path>.weight` is reachable as `lora_unet_<path
  with _>` and as `<path>`; every diffusers module that `unet_to_diffusers` maps to an LDM
  weight is reachable as `lora_unet_<diffusers path with _>` and, for diffusers files, as
  `<path>` and `unet.<path>` with `.to_` written `.processor.to_` and `to_out.0` as `to_out`
  (the attention-processor names of diffusers' first LoRA format);
- text encoder: layer n's q/k/v/out projections and fc1/fc2 as
  `lora_te_text_model_encoder_layers_<n>_<name with _>`, `lora_te1_...`, and as
  `text_encoder.text_model.encoder.layers.<n>.<name>` (diffusers files); SDXL's second encoder
  (bigG, converted to the same names) as `lora_te2_...` and `text_encoder_2.text_model...`;
- the tensors of a reachable name are read as `.lora_up.weight`/`.lora_down.weight`,
  `_lora.up.weight`, `.lora_B.weight`/`.lora_A.weight`, `.lora.up.weight` or
  `.lora_linear_layer.up.weight`; alpha only from `<name>.alpha` (a header alpha is not read),
  scale `alpha / rank`, else 1; every key not read is "lora key not loaded".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

A1111 = "AUTOMATIC1111"
COMFYUI = "ComfyUI/Forge"

_RESNET_A1111 = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_CLIP_LAYER_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_CLIP_LAYER_NAMES += ("self_attn.out_proj", "mlp.fc1", "mlp.fc2")


@dataclass
class Applied:
    """What one consumer does with a file: the modules it patches, by the key of their down
    (A) weight in the file, with the scale it applies (alpha / rank)."""

    consumer: str
    scales: dict[str, float] = field(default_factory=dict)


def _groups(keys: Iterable[str], split) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        name, tensor = split(key)
        groups.setdefault(name, {})[tensor] = key
    return groups


def _scale(alpha: torch.Tensor | None, down: torch.Tensor) -> float:
    if alpha is None:
        return 1.0
    return float(alpha.float().item()) / int(down.shape[0])


# --- AUTOMATIC1111 ---------------------------------------------------------------------------


def a1111_compvis_name(name: str, sd2: bool) -> str:
    """A1111's `convert_diffusers_name_to_compvis` (see the module docstring)."""
    m = re.match(r"lora_unet_conv_in(.*)", name)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", name)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        level, item = int(m[2]), int(m[4])
        rest = _RESNET_A1111.get(m[5], m[5]) if m[3] == "resnets" else m[5]
        block = 1 + 3 * level + item if m[1] == "down" else 3 * level + item
        side = "input" if m[1] == "down" else "output"
        return f"diffusion_model_{side}_blocks_{block}_{1 if m[3] == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        rest = _RESNET_A1111.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        index = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{index}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        level = int(m[1])
        return f"diffusion_model_output_blocks_{2 + level * 3}_{2 if level > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        if not sd2:
            return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        return f"model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
    if m:
        return f"1_model_transformer_resblocks_{m[1]}_{_openclip_rest(m[2])}"
    return name


def _openclip_rest(rest: str) -> str:
    rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
    return rest.replace("self_attn", "attn")


def a1111_modules(ldm_shapes: Mapping[str, torch.Size]) -> dict[str, torch.Size]:
    """A1111's `network_layer_mapping` of a loaded SD 1/2 or SDXL model: module name with `_`
    -> shape of its weight (OpenCLIP's fused attention: of `in_proj_weight`); SDXL's text
    encoders by embedder index (`0_transformer_...`, `1_model_...`)."""
    modules = {}
    for key, shape in ldm_shapes.items():
        for prefix in ("model.", "cond_stage_model.", "conditioner.embedders."):
            if key.startswith(prefix) and key.endswith(("weight", "in_proj_weight")):
                module = key[len(prefix) :].rsplit(".", 1)[0]
                modules[module.replace(".", "_")] = shape
    return modules


def a1111_applied(state: Mapping[str, torch.Tensor], ldm_shapes: Mapping[str, torch.Size]):
    """The modules of the file A1111 patches, with their scale, and those it does not."""
    mapping = a1111_modules(ldm_shapes)
    sd2 = any(k.startswith("model_transformer_resblocks") for k in mapping)
    groups = _groups(state, lambda key: (key.partition(".")[0], key.partition(".")[2]))
    result = Applied(A1111)
    fused: dict[str, dict[str, str]] = {}  # SD 2 attention layer -> {q/k/v/out: file name}
    for name, tensors in groups.items():
        target = a1111_compvis_name(name, sd2)
        found = target in mapping
        openclip = sd2 or target.startswith("1_model_transformer_resblocks_")
        parent = re.match(r"(.*_attn)_([qkv]_proj|out_proj)$", target) if openclip else None
        if parent and parent[1] in mapping:
            fused.setdefault(parent[1], {})[parent[2]] = name
            found = True
        if not found and "lora_unet" in name:
            target = name.replace("lora_unet", "diffusion_model")
            found = target in mapping
        elif not found and "lora_te1_text_model" in name:
            target = name.replace("lora_te1_text_model", "0_transformer_text_model")
            found = target in mapping
        if found and "lora_up.weight" in tensors and "lora_down.weight" in tensors:
            down = tensors["lora_down.weight"]
            result.scales[down] = _scale(state.get(tensors.get("alpha", "")), state[down])
    # OpenCLIP's text attention (SD 2, SDXL's bigG) is one MultiheadAttention: A1111 patches its in_proj and out_proj
    # only when q, k, v and out_proj of that layer are all in the file, else none of them.
    for parts in fused.values():
        if set(parts) != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            for name in parts.values():
                result.scales.pop(name + ".lora_down.weight", None)
    return result


# --- ComfyUI ---------------------------------------------------------------------------------


def _ldm_blocks(unet_keys: Iterable[str]) -> tuple[int, set[str], int]:
    """(res blocks per level, output/input blocks that hold a transformer, level count)."""
    keys = list(unet_keys)
    attends = {
        m[1] for k in keys if (m := re.match(r"((input|output)_blocks\.\d+)\.1\.proj_in", k))
    }
    downs = {int(m[1]) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
    first_down = min(downs)
    return first_down - 1, attends, len(downs) + 1


def comfyui_unet_to_diffusers(unet_keys: Iterable[str]) -> dict[str, str]:
    """ComfyUI's `unet_to_diffusers`: diffusers module path -> LDM module path, derived (as
    ComfyUI's model detection does) from the LDM keys of the model."""
    keys = [k for k in unet_keys]
    per_level, attends, levels = _ldm_blocks(keys)
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    resnet |= {"conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
    attention = ("proj_in", "proj_out", "norm")
    block = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q")
    block += ("attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    block += ("norm1", "norm2", "norm3")
    out: dict[str, str] = {}

    def add_attention(src: str, dst: str) -> None:
        for name in attention:
            out[f"{src}.{name}"] = f"{dst}.{name}"
        depth = {
            int(m[1])
            for k in keys
            if (m := re.match(re.escape(dst) + r"\.transformer_blocks\.(\d+)\.", k))
        }
        for t in sorted(depth):
            for name in block:
                out[f"{src}.transformer_blocks.{t}.{name}"] = f"{dst}.transformer_blocks.{t}.{name}"

    for level in range(levels):
        n = 1 + (per_level + 1) * level
        for i in range(per_level):
            for d, o in resnet.items():
                out[f"down_blocks.{level}.resnets.{i}.{d}"] = f"input_blocks.{n + i}.0.{o}"
            if f"input_blocks.{n + i}" in attends:
                add_attention(f"down_blocks.{level}.attentions.{i}", f"input_blocks.{n + i}.1")
        out[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n + per_level}.0.op"
    add_attention("mid_block.attentions.0", "middle_block.1")
    for i, n in enumerate((0, 2)):
        for d, o in resnet.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{o}"
    for level in range(levels):
        n = (per_level + 1) * level
        for i in range(per_level + 1):
            c = 1
            for d, o in resnet.items():
                out[f"up_blocks.{level}.resnets.{i}.{d}"] = f"output_blocks.{n + i}.0.{o}"
            if f"output_blocks.{n + i}" in attends:
                c += 1
                add_attention(f"up_blocks.{level}.attentions.{i}", f"output_blocks.{n + i}.1")
            if i == per_level:
                out[f"up_blocks.{level}.upsamplers.0.conv"] = f"output_blocks.{n + i}.{c}.conv"
    basic = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0"}
    basic |= {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    basic |= {
        "class_embedding.linear_1": "label_emb.0.0",
        "class_embedding.linear_2": "label_emb.0.2",
    }
    return out | basic


def comfyui_key_map(ldm_shapes: Mapping[str, torch.Size]) -> dict[str, str]:
    """ComfyUI's LoRA key map of a loaded SD 1/2 or SDXL model: file module name -> LDM weight
    key."""
    unet = {
        k[len("model.diffusion_model.") :]: k
        for k in ldm_shapes
        if k.startswith("model.diffusion_model.")
    }
    key_map = {}
    for path, key in unet.items():
        if path.endswith(".weight"):
            module = path[: -len(".weight")]
            key_map["lora_unet_" + module.replace(".", "_")] = key
            key_map[module] = key
    for diffusers, ldm in comfyui_unet_to_diffusers(unet).items():
        key = f"model.diffusion_model.{ldm}.weight"
        key_map["lora_unet_" + diffusers.replace(".", "_")] = key
        processor = diffusers.replace(".to_", ".processor.to_")
        processor = processor[:-2] if processor.endswith(".to_out.0") else processor
        key_map[processor] = key
        key_map["unet." + processor] = key
    for second, layer, name, key in _comfyui_text_layers(ldm_shapes):
        flat = name.replace(".", "_")
        if second:  # SDXL's clip_g
            key_map[f"lora_te2_text_model_encoder_layers_{layer}_{flat}"] = key
            key_map[f"text_encoder_2.text_model.encoder.layers.{layer}.{name}"] = key
            continue
        key_map[f"lora_te_text_model_encoder_layers_{layer}_{flat}"] = key
        key_map[f"lora_te1_text_model_encoder_layers_{layer}_{flat}"] = key
        key_map[f"text_encoder.text_model.encoder.layers.{layer}.{name}"] = key
    return key_map


_CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_OPENCLIP = ("cond_stage_model.model.", "conditioner.embedders.1.model.")


def _comfyui_text_layers(ldm_shapes: Mapping[str, torch.Size]):
    """(second encoder?, layer, HF module name, LDM weight key) of the text encoders as ComfyUI
    names them: CLIP (SD 1, SDXL's first) as it is, OpenCLIP (SD 2, SDXL's bigG) converted to the
    same names (q/k/v split from in_proj)."""
    openclip = {
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for key in ldm_shapes:
        for prefix in _CLIP_L:
            m = re.match(
                re.escape(prefix) + r"text_model\.encoder\.layers\.(\d+)\.(.+)\.weight$", key
            )
            if m and m[2] in _CLIP_LAYER_NAMES:
                yield False, int(m[1]), m[2], key
        for prefix in _OPENCLIP:
            second = prefix.startswith("conditioner.")
            m = re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)$", key)
            if m and m[2] == "attn.in_proj_weight":
                for p in ("q", "k", "v"):
                    yield second, int(m[1]), f"self_attn.{p}_proj", key
            elif m and m[2].removesuffix(".weight") in openclip and m[2].endswith(".weight"):
                yield second, int(m[1]), openclip[m[2].removesuffix(".weight")], key


_COMFYUI_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def comfyui_applied(state: Mapping[str, torch.Tensor], ldm_shapes: Mapping[str, torch.Size]):
    """The modules of the file ComfyUI patches, with their scale, and those it does not."""
    key_map = comfyui_key_map(ldm_shapes)
    result = Applied(COMFYUI)
    for name, target in key_map.items():
        for up, down in _COMFYUI_PAIRS:
            if name + up in state and name + down in state and target in ldm_shapes:
                alpha = state.get(name + ".alpha")
                result.scales[name + down] = _scale(alpha, state[name + down])
                break
    return result
