"""The layout of the adapter file sdtune writes, which diffusers and peft read unchanged.

Keys are peft's own names with the model part in front:

- `unet.<module>.lora_A.weight` (down), `unet.<module>.lora_B.weight` (up);
- `text_encoder.text_model.<module>.lora_A.weight` / `lora_B.weight` (and SDXL's
  `text_encoder_2.text_model.<module>...`, which `StableDiffusionXLPipeline.load_lora_weights`
  reads as the second encoder's): the `text_model.` level is always written. transformers 4.x names the CLIP modules under it and needs it; transformers 5
  has no such level but maps the old names on loading, and ComfyUI maps text-encoder keys of a
  diffusers file only under `text_encoder.text_model.`;
- DoRA: `<module>.lora_magnitude_vector.weight`. peft accepts it with or without `.weight`;
  transformers 5 loads a text encoder's magnitudes only with it.

The header's `lora_adapter_metadata` holds, per part, the LoraConfig arguments that change what
the adapter computes (`LORA_CONFIG_FIELDS`) and nothing else: newer peft releases add fields
(`alora_invocation_tokens`, `arrow_config`, ...) that older ones reject, and a LoraConfig that
cannot be built makes diffusers refuse the whole file. `target_modules` lists the adapted
modules by full name (as diffusers does when it infers a config), so no other module matches.

Files of the earlier layout (`convert_state_dict_to_diffusers` of peft's state dict: attention
projections as `.lora.down/.lora.up` and `.lora_linear_layer.down/up`, everything else as
`lora_A/lora_B`) are what `old_names` finds: diffusers converts a file only when all of its
keys are old-style, so it drops the attention layers of such a mixed file.
"""

from __future__ import annotations

import json
from collections import Counter

import torch

from sdtune.adapters import formats
from sdtune.adapters.formats import TEXT_PARTS, Layer
from sdtune.errors import SdtuneError

DOWN = ".lora_A.weight"
UP = ".lora_B.weight"
MAGNITUDE = ".lora_magnitude_vector.weight"
TEXT_MODEL = "text_model."
LORA_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
    "lora_dropout",
    "bias",
)
_OLD_SPELLINGS = (".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.")
_MAGNITUDE_STEM = ".lora_magnitude_vector"


def file_prefix(module: str) -> str:
    """The key prefix of a canonical module name (`text_encoder.encoder...` gets `text_model.`;
    so does `text_encoder_2.`, except its `text_projection`, which is outside that level)."""
    part, _, name = module.partition(".")
    if part in TEXT_PARTS and not name.startswith((TEXT_MODEL, "text_projection")):
        return f"{part}.{TEXT_MODEL}{name}"
    return module


def split_magnitude_key(key: str) -> str | None:
    """The canonical module of a DoRA magnitude key (any spelling); None for other keys."""
    for suffix in (MAGNITUDE, _MAGNITUDE_STEM):
        if key.endswith(suffix):
            return formats.strip_text_model(key[: -len(suffix)])
    return None


def build_part_metadata(
    modules: list[str], ranks: dict[str, int], alphas: dict[str, float], settings: dict
) -> dict:
    """One part's LoraConfig arguments: the most common rank and alpha, patterns for the rest.

    `modules`, `ranks` and `alphas` use module names inside the part (`down_blocks.0...`,
    `encoder.layers.0...`); `settings` adds use_dora, use_rslora, lora_dropout and bias.
    """
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    meta = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != rank},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha},
        "use_dora": False,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
    }
    meta.update({k: v for k, v in settings.items() if k in LORA_CONFIG_FIELDS})
    return meta


def peft_model_metadata(model, state: dict[str, torch.Tensor]) -> dict:
    """The metadata of a peft-wrapped model whose peft state dict is `state`."""
    config = model.peft_config["default"]
    # transformers 4 names CLIP modules under text_model.; the metadata names them without it
    modules = sorted({_module_of(k).removeprefix(TEXT_MODEL) for k in state if _module_of(k)})
    ranks = {m: _pattern_value(m, config.rank_pattern, config.r) for m in modules}
    alphas = {m: _pattern_value(m, config.alpha_pattern, config.lora_alpha) for m in modules}
    settings = {
        "use_dora": bool(config.use_dora),
        "use_rslora": bool(config.use_rslora),
        "lora_dropout": float(config.lora_dropout),
        "bias": config.bias,
    }
    return build_part_metadata(modules, ranks, alphas, settings)


def _module_of(key: str) -> str | None:
    for suffix in (".lora_A.weight", ".lora_B.weight", _MAGNITUDE_STEM):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _pattern_value(module: str, patterns: dict, default):
    value = formats.match_pattern(module, patterns or {})
    return value if value is not None else default


def peft_state_to_file(part: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's state dict of one part (`get_peft_model_state_dict`) under the file's key names."""
    out = {}
    for key, value in state.items():
        if key.endswith(_MAGNITUDE_STEM):
            key += ".weight"
        out[file_prefix(f"{part}.{key}")] = value.detach().to("cpu").contiguous()
    return out


def layers_to_file(
    layers: dict[str, Layer], magnitudes: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """LoRA layers (and DoRA magnitudes) as the file's tensors and per-part metadata.

    Alphas stay as they are (the metadata carries them), so the file reads back to the same
    layers. A layer without an alpha gets alpha = rank, which is what it means.
    """
    magnitudes = magnitudes or {}
    state: dict[str, torch.Tensor] = {}
    per_part: dict[str, dict] = {}
    for module, layer in sorted(layers.items()):
        if layer.kind != "lora":
            raise SdtuneError(f"'{module}' is a {layer.kind} layer; convert it to LoRA first")
        key = file_prefix(module)
        state[key + DOWN] = layer.down.contiguous()
        state[key + UP] = layer.up.contiguous()
        if module in magnitudes:
            state[key + MAGNITUDE] = magnitudes[module].contiguous()
        part, _, name = module.partition(".")
        entry = per_part.setdefault(part, {"modules": [], "ranks": {}, "alphas": {}, "dora": False})
        entry["modules"].append(name)
        entry["ranks"][name] = layer.rank
        entry["alphas"][name] = float(layer.alpha) if layer.alpha is not None else layer.rank
        entry["dora"] = entry["dora"] or module in magnitudes
    meta = {
        part: build_part_metadata(e["modules"], e["ranks"], e["alphas"], {"use_dora": e["dora"]})
        for part, e in per_part.items()
    }
    return state, meta


def metadata_header(per_part: dict[str, dict]) -> str:
    """diffusers' `lora_adapter_metadata` value: `{"unet.r": 4, "text_encoder.r": 4, ...}`."""
    flat = {f"{p}.{k}": v for p, cfg in per_part.items() for k, v in cfg.items()}
    return json.dumps(flat, sort_keys=True)


def old_names(keys) -> list[str]:
    """Keys in diffusers' earlier names (`.lora.down`, `.lora_linear_layer.`): see the docstring."""
    return sorted(k for k in keys if any(s in k for s in _OLD_SPELLINGS))


def needs_rewrite(keys, meta: dict) -> list[str]:
    """Why a diffusers-layout file is not in the layout this module writes; [] if it is."""
    keys = list(keys)
    reasons = []
    old = old_names(keys)
    pairs = [k for k in keys if k.endswith((DOWN, UP))]
    if old:
        what = "beside PEFT names" if pairs else "only"
        reasons.append(f"{len(old)} keys in diffusers' old .lora.down/.lora.up names {what}")
    if any(k.endswith(_MAGNITUDE_STEM) for k in keys):
        reasons.append("DoRA magnitudes without .weight")
    extra = sorted({k.partition(".")[2] for k in meta} - set(LORA_CONFIG_FIELDS))
    if extra:
        reasons.append(f"header fields older peft rejects ({', '.join(extra[:3])})")
    te = [(p, k) for k in keys for p in TEXT_PARTS if k.startswith(p + ".")]
    if any(not k.startswith((f"{p}.{TEXT_MODEL}", f"{p}.text_projection")) for p, k in te):
        reasons.append("text-encoder keys without text_model.")
    return reasons
