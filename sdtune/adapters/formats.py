"""Adapter key layouts (diffusers, PEFT, kohya/A1111/ComfyUI) and one in-memory form for all.

Every adapter sdtune reads becomes a dict `module -> Layer`, where `module` is the diffusers
module path with its part in front (`unet.down_blocks.0...attn1.to_q`, `text_encoder.encoder.
layers.0.self_attn.q_proj`, SDXL's second encoder `text_encoder_2.encoder...`; text encoders'
names have no `text_model.` level, as CLIPTextModel has none in transformers 5). A layer's weight change is `delta = alpha / rank * up @ down` for LoRA/LoCon;
LyCORIS LoHa and LoKr layers keep their factors and give their own `delta`. A Tucker layer
(LyCORIS `use_tucker`) adds a core (`lora_mid`, `hada_t1`/`hada_t2`); a DoRA layer (Liu et al.
2024) adds a per-output-row magnitude that rescales the adapted weight instead of adding to it.

kohya layout (what kohya sd-scripts writes for SD 1/2, and what A1111 and ComfyUI read):
- U-Net: `lora_unet_` + the diffusers module path with `.` -> `_`
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
- text encoder (SD 1 CLIP-L and SD 2 OpenCLIP-H, both in Hugging Face layout):
  `lora_te_text_model_` + the module path with `_` (`lora_te_text_model_encoder_layers_0_self_
  attn_q_proj`); the `text_model_` level is always written, whatever transformers names it, and
  read with or without it (tools run on transformers 5 write `lora_te_encoder_layers_...`);
- per module `.lora_down.weight` (rank x in, or rank x in x kh x kw for convolutions),
  `.lora_up.weight` (out x rank, or out x rank x 1 x 1) and `.alpha` (a 0-d tensor: the real
  alpha, so the scale is alpha / rank).
kohya layout for SDXL (what sd-scripts' SDXL LoRA writes: it trains on the original SGM U-Net):
- U-Net: `lora_unet_` + the module's ORIGINAL name with `_` (`lora_unet_input_blocks_4_1_
  transformer_blocks_0_attn1_to_q`, `lora_unet_middle_block_0_in_layers_2`, `lora_unet_
  output_blocks_2_2_conv`), the names `sdtune.models.ldm_keys.unet_prefix_map` derives from the
  U-Net's config (`ModelModules.original`); the diffusers-path names that LyCORIS writes when it
  wraps a diffusers U-Net are read too;
- text encoders: `lora_te1_text_model_...` (CLIP ViT-L) and `lora_te2_text_model_...` (OpenCLIP
  bigG, in its Hugging Face names), read with or without the `text_model_` level.
Underscores make the name ambiguous to split, so kohya names are decoded by looking them up in a
table built from the real module names of the model (`kohya_table`), never by guessing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from sdtune.errors import SdtuneError

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's OpenCLIP bigG (the refiner's only encoder)
TEXT_PARTS = (TEXT_ENCODER, TEXT_ENCODER_2)
PARTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIX = "lora_te_"
KOHYA_TEXT_ALIASES = ("lora_te_", "lora_te1_")  # SDXL-era tools write te1 for the first encoder
KOHYA_XL_TEXT_PREFIXES = {TEXT_ENCODER: "lora_te1_", TEXT_ENCODER_2: "lora_te2_"}
KOHYA_TEXT_MODEL = "text_model_"
KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
KOHYA_ALPHA = ".alpha"
KOHYA_DORA = ".dora_scale"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("lora_mid", "hada_t1", "hada_t2")
# LyCORIS layers that cannot be applied: tensor-name start -> what to call them in the refusal.
UNSUPPORTED_KEYS = {
    "lokr_t": "LoKr with a Tucker core (lokr_t2)",
    "oft_": "OFT (oft_blocks)",
    "glora_": "GLoRA",
    "on_input": "IA3",
    "diff": "full fine-tuning diff (LyCORIS full)",
    "w_norm": "norm-layer diff",
    "b_norm": "norm-layer diff",
}

# (down suffix, up suffix) of each diffusers/PEFT spelling of a LoRA pair.
DIFFUSERS_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
PEFT_PREFIX = "base_model.model."
DORA_MAGNITUDE = "lora_magnitude_vector"
_TEXT_MODEL_LEVEL = "text_model."


@dataclass
class Layer:
    """One adapted module. LoRA: `down`, `up`, `alpha`. LoHa/LoKr: `factors` by LyCORIS name.

    `factors` also holds a LoRA's Tucker core (`lora_mid`). `magnitude` (DoRA) is the wanted
    norm of each output row of the adapted weight. `shape` is the module's weight shape when
    the adapter was read against a model (LoHa/LoKr factors alone do not tell a conv's kernel).
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None  # None: alpha = rank (scale 1)
    kind: str = "lora"  # "lora" | "loha" | "lokr"
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    magnitude: torch.Tensor | None = None  # DoRA: (out,)
    shape: torch.Size | None = None

    @property
    def rank(self) -> int:
        if self.kind == "lora":
            return int(self.down.shape[0])
        for name in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
            if name in self.factors:
                return int(self.factors[name].shape[0])
        return 0  # a LoKr of full factors has no rank

    @property
    def scale(self) -> float:
        """The factor in front of the product of the factors (alpha / rank)."""
        if self.alpha is None or self.rank == 0:
            return 1.0
        return float(self.alpha) / self.rank

    @property
    def algorithm(self) -> str:
        """LoRA, LoCon (a LoRA on a k x k convolution), LoHa or LoKr, + Tucker, + DoRA."""
        if self.kind == "lora":
            kernel = self.factors.get("lora_mid", self.down)
            name = "LoCon" if kernel.ndim == 4 and kernel.shape[2:].numel() > 1 else "LoRA"
        else:
            name = {"loha": "LoHa", "lokr": "LoKr"}[self.kind]
        if any(k in self.factors for k in TUCKER_KEYS):
            name += "+Tucker"
        return name + ("+DoRA" if self.magnitude is not None else "")

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor of the layer (for dtype and shape checks)."""
        main = [self.down, self.up] if self.kind == "lora" else []
        extra = [self.magnitude] if self.magnitude is not None else []
        return main + list(self.factors.values()) + extra


class ModelModules(dict):
    """Canonical module name -> weight shape of a model's adaptable modules.

    `original` is set for SDXL models only: the U-Net's original (SGM) module path of each
    diffusers path (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`), the
    names SDXL's kohya layout uses.
    """

    original: dict[str, str] | None = None


def strip_text_model(module: str) -> str:
    """`text_encoder.text_model.encoder...` -> `text_encoder.encoder...` (transformers 5 names);
    the same for `text_encoder_2.`, whose CLIPTextModelWithProjection keeps the level."""
    part, _, path = module.partition(".")
    if part in TEXT_PARTS and path.startswith(_TEXT_MODEL_LEVEL):
        return f"{part}.{path[len(_TEXT_MODEL_LEVEL) :]}"
    return module


def kohya_name(module: str, original: dict[str, str] | None = None) -> str:
    """The kohya name of a canonical module name (see the module docstring).

    `original` (an SDXL model's `ModelModules.original`) selects SDXL's names: the U-Net under
    its original module names, the text encoders as `lora_te1_`/`lora_te2_`.
    """
    part, _, path = module.partition(".")
    if part == UNET:
        path = original.get(path, path) if original is not None else path
        return KOHYA_UNET_PREFIX + path.replace(".", "_")
    if part in TEXT_PARTS:
        if original is None and part == TEXT_ENCODER_2:
            raise SdtuneError(
                f"module '{module}' is of a second text encoder, which only SDXL models have"
            )
        prefix = KOHYA_XL_TEXT_PREFIXES[part] if original is not None else KOHYA_TEXT_PREFIX
        path = path.removeprefix(_TEXT_MODEL_LEVEL)
        return prefix + KOHYA_TEXT_MODEL + path.replace(".", "_")
    raise SdtuneError(
        f"module '{module}' belongs to no known part (expected unet., text_encoder. or "
        "text_encoder_2.)"
    )


def kohya_table(modules: Iterable[str]) -> dict[str, str]:
    """kohya name -> canonical module name, for every module of a model, with the aliases
    other tools write: SD `lora_te1_`, names without `text_model_`, SDXL U-Net names in
    diffusers paths (LyCORIS on a diffusers U-Net)."""
    original = getattr(modules, "original", None)
    table = {}
    for module in modules:
        name = kohya_name(module, original)
        if original is not None and module.startswith(UNET + "."):
            table[kohya_name(module)] = module  # the diffusers-path spelling
        table[name] = module
        for prefix in (KOHYA_TEXT_PREFIX, *KOHYA_XL_TEXT_PREFIXES.values()):
            if not name.startswith(prefix):
                continue
            path = name[len(prefix) :]
            aliases = KOHYA_TEXT_ALIASES if prefix == KOHYA_TEXT_PREFIX else (prefix,)
            for alias in aliases:  # with and without the `text_model_` level
                table[alias + path] = module
                table[alias + path.removeprefix(KOHYA_TEXT_MODEL)] = module
    return table


# diffusers' SDXL added-conditioning MLP, which the original U-Net calls label_emb.0
_XL_ADD_EMBEDDING = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def original_unet_names(unet_config, paths: Iterable[str]) -> dict[str, str]:
    """The original (SGM/LDM) module path of each diffusers U-Net module path, from the config
    (`sdtune.models.ldm_keys.unet_prefix_map`); modules it does not name keep their path."""
    from sdtune.models.ldm_keys import rename_keys, unet_prefix_map

    prefix_map = unet_prefix_map(unet_config)
    names = {}
    for path in paths:
        if path in _XL_ADD_EMBEDDING:
            names[path] = _XL_ADD_EMBEDDING[path]
            continue
        try:
            names[path] = rename_keys([path + ".weight"], prefix_map, "U-Net")[
                path + ".weight"
            ].removesuffix(".weight")
        except SdtuneError:
            names[path] = path
    return names


def detect_layout(keys: Iterable[str]) -> str:
    """ "kohya", "peft" or "diffusers", from the key names; an error if none fits."""
    keys = list(keys)
    if any(k.startswith((KOHYA_UNET_PREFIX, "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith(tuple(p + "." for p in PARTS)) for k in keys):
        return "diffusers"
    raise SdtuneError(
        "no LoRA keys found (expected lora_unet_*/lora_te_* (kohya), unet.*/text_encoder.* "
        "(diffusers) or base_model.model.* (PEFT))"
    )


def split_pair_key(key: str) -> tuple[str, str] | None:
    """(module, "down"|"up") of a diffusers/PEFT LoRA key; None for other keys."""
    for down, up in DIFFUSERS_PAIRS:
        if key.endswith(down):
            return key[: -len(down)], "down"
        if key.endswith(up):
            return key[: -len(up)], "up"
    return None


def parse_diffusers(
    state: dict[str, torch.Tensor], alpha_of: dict[str, float] | None = None
) -> dict[str, Layer]:
    """Layers of a diffusers- or PEFT-named state dict (module names as given, canonicalised).

    `alpha_of` maps canonical module names to their alpha; modules without one get alpha = rank.
    """
    layers: dict[str, Layer] = {}
    magnitudes = {}
    for key, value in state.items():
        split = split_pair_key(key)
        if split is None:
            if DORA_MAGNITUDE in key:
                magnitudes[strip_text_model(key.partition("." + DORA_MAGNITUDE)[0])] = value
                continue
            if key.endswith(".alpha"):
                continue
            raise SdtuneError(f"key '{key}' is not a LoRA down/up weight of any known layout")
        module, which = split
        module = strip_text_model(module)
        layer = layers.setdefault(module, Layer())
        setattr(layer, which, value)
    for module, layer in layers.items():
        if layer.down is None or layer.up is None:
            raise SdtuneError(f"module '{module}' has only one half of its LoRA pair (down/up)")
        layer.alpha = (alpha_of or {}).get(module)
        if module in magnitudes:
            layer.magnitude = magnitudes.pop(module).flatten()
    if magnitudes:
        raise SdtuneError(
            f"DoRA magnitude of '{next(iter(magnitudes))}' has no LoRA pair beside it"
        )
    return layers


def kohya_groups(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya module name -> {tensor name after the first dot: tensor}."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, dot, rest = key.partition(".")
        if not dot:
            raise SdtuneError(f"key '{key}' has no '.<tensor>' part; not a kohya/LyCORIS file")
        groups.setdefault(name, {})[rest] = value
    return groups


def _kohya_magnitude(name: str, dora_scale: torch.Tensor | None) -> torch.Tensor | None:
    """LyCORIS' `dora_scale` as a per-output-row magnitude; per-input magnitudes are refused."""
    if dora_scale is None:
        return None
    if dora_scale.ndim > 1 and dora_scale.shape[1:].numel() != 1:
        raise SdtuneError(
            f"'{name}': DoRA with per-input-channel magnitudes (dora_scale of shape "
            f"{tuple(dora_scale.shape)}, LyCORIS wd_on_output=False) cannot be applied; "
            "per-output magnitudes (out x 1) can"
        )
    return dora_scale.flatten()


def kohya_layer(name: str, tensors: dict[str, torch.Tensor]) -> Layer:
    """One kohya/LyCORIS module's tensors as a Layer (LoRA, LoCon, LoHa, LoKr; Tucker; DoRA)."""
    alpha = tensors.get("alpha")
    alpha = float(alpha.float().item()) if alpha is not None else None
    stems = {k.removesuffix(".weight") for k in tensors}
    for stem in sorted(stems):
        for start, what in UNSUPPORTED_KEYS.items():
            if stem.startswith(start):
                raise SdtuneError(
                    f"'{name}': LyCORIS {what} layers cannot be applied; LoRA, LoCon, LoHa, "
                    "LoKr (each optionally with DoRA) and Tucker LoCon/LoHa can"
                )
    magnitude = _kohya_magnitude(name, tensors.get("dora_scale"))
    if "lora_down" in stems and "lora_up" in stems:
        mid = {"lora_mid": tensors["lora_mid.weight"]} if "lora_mid" in stems else {}
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        return Layer(down, up, alpha, factors=mid, magnitude=magnitude)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= stems:
        factors = {k: tensors[k] for k in LOHA_KEYS if k in tensors}
        return Layer(alpha=alpha, kind="loha", factors=factors, magnitude=magnitude)
    has_w1 = "lokr_w1" in stems or {"lokr_w1_a", "lokr_w1_b"} <= stems
    has_w2 = "lokr_w2" in stems or {"lokr_w2_a", "lokr_w2_b"} <= stems
    if has_w1 and has_w2:
        factors = {k: tensors[k] for k in LOKR_KEYS if k in tensors}
        return Layer(alpha=alpha, kind="lokr", factors=factors, magnitude=magnitude)
    raise SdtuneError(
        f"'{name}' has tensors {sorted(stems)}; expected lora_down/lora_up (LoRA, LoCon), "
        "hada_w1_a/b + hada_w2_a/b (LoHa) or lokr_w1/lokr_w2 (LoKr)"
    )


def parse_kohya(state: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, Layer]:
    """Layers of a kohya/LyCORIS state dict, named by `table` (see `kohya_table`).

    A name missing from the table keeps its kohya name, so the fit check can list it: such
    names are exactly the keys A1111 reports as "lora key not loaded".
    """
    groups = kohya_groups(state)
    return {table.get(name, name): kohya_layer(name, tensors) for name, tensors in groups.items()}


def to_kohya_state_dict(
    layers: dict[str, Layer], original: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """The kohya state dict of LoRA layers: down, up and the real alpha per module.

    `original`: an SDXL model's original U-Net names (`ModelModules.original`), for SDXL's names.
    """
    state = {}
    for module, layer in sorted(layers.items()):
        if layer.kind != "lora" or "lora_mid" in layer.factors:
            raise SdtuneError(f"'{module}' is a {layer.algorithm} layer; convert it to LoRA first")
        name = kohya_name(module, original)
        alpha = float(layer.alpha) if layer.alpha is not None else float(layer.rank)
        state[name + KOHYA_DOWN] = layer.down.contiguous()
        state[name + KOHYA_UP] = layer.up.contiguous()
        state[name + KOHYA_ALPHA] = torch.tensor(alpha, dtype=layer.down.dtype)
        if layer.magnitude is not None:  # LyCORIS' layout: out x 1 (x 1 x 1)
            ones = (1,) * (layer.down.ndim - 1)
            state[name + KOHYA_DORA] = layer.magnitude.reshape(-1, *ones).contiguous()
    return state


def to_peft_state_dict(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """`unet.X.lora_A.weight` / `lora_B` keys with alpha folded into B (so scale is 1).

    This is what diffusers' `load_lora_weights` reads exactly without any metadata: with no
    alphas it uses alpha = rank per module. DoRA magnitudes go under peft's own key, in the
    shape peft gives them (out for a linear layer, 1 x out x 1 x 1 for a convolution); the
    text encoder's with `.weight` after it, the only spelling its loader maps.
    """
    state = {}
    for module, layer in layers.items():
        if layer.kind != "lora" or "lora_mid" in layer.factors:
            raise SdtuneError(f"'{module}' is a {layer.algorithm} layer; convert it to LoRA first")
        state[f"{module}.lora_A.weight"] = layer.down.contiguous()
        state[f"{module}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
        if layer.magnitude is not None:
            shape = (1, -1, 1, 1) if layer.down.ndim == 4 else (-1,)
            # diffusers hands text-encoder keys to transformers, which maps `.weight` names only
            text = module.partition(".")[0] in TEXT_PARTS
            key = DORA_MAGNITUDE + (".weight" if text else "")
            state[f"{module}.{key}"] = layer.magnitude.reshape(shape).contiguous()
    return state


def match_pattern(module: str, patterns: dict[str, float]) -> float | None:
    """PEFT's rank/alpha pattern rule: a key (a regular expression) matches a module name that
    ends with it after a dot, or the whole name (peft.utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        try:
            found = re.match(rf"(.*\.)?({pattern})$", module)
        except re.error:
            found = module == pattern or module.endswith("." + pattern)
        if found:
            return value
    return None
