"""Adapter key layouts (diffusers, PEFT, kohya/A1111/ComfyUI) and one in-memory form for all.

Every adapter sdtune reads becomes a dict `module -> Layer`, where `module` is the diffusers
module path with its part in front (`unet.down_blocks.0...attn1.to_q`, `text_encoder.encoder.
layers.0.self_attn.q_proj`; the text encoder's names have no `text_model.` level, as in
transformers 5). A layer's weight change is `delta = alpha / rank * up @ down` for LoRA/LoCon;
LyCORIS LoHa and LoKr layers keep their factors and give their own `delta`.

kohya layout (what kohya sd-scripts writes for SD 1/2, and what A1111 and ComfyUI read):
- U-Net: `lora_unet_` + the diffusers module path with `.` -> `_`
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`);
- text encoder (SD 1 CLIP-L and SD 2 OpenCLIP-H, both in Hugging Face layout):
  `lora_te_text_model_` + the module path with `_` (`lora_te_text_model_encoder_layers_0_self_
  attn_q_proj`); the `text_model_` level is always written, whatever transformers names it;
- per module `.lora_down.weight` (rank x in, or rank x in x kh x kw for convolutions),
  `.lora_up.weight` (out x rank, or out x rank x 1 x 1) and `.alpha` (a 0-d tensor: the real
  alpha, so the scale is alpha / rank).
Underscores make the name ambiguous to split, so kohya names are decoded by looking them up in a
table built from the real module names of the model (`kohya_table`), never by guessing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from sdtune.errors import SdtuneError

UNET = "unet"
TEXT_ENCODER = "text_encoder"
PARTS = (UNET, TEXT_ENCODER)

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TEXT_PREFIX = "lora_te_"
KOHYA_TEXT_ALIASES = ("lora_te_", "lora_te1_")  # SDXL-era tools write te1 for the first encoder
KOHYA_TEXT_MODEL = "text_model_"
KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
KOHYA_ALPHA = ".alpha"
KOHYA_DORA = ".dora_scale"
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED_KEYS = ("lora_mid", "hada_t1", "hada_t2", "lokr_t2", "oft_blocks", "glora_")

# (down suffix, up suffix) of each diffusers/PEFT spelling of a LoRA pair.
DIFFUSERS_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
PEFT_PREFIX = "base_model.model."
_TEXT_MODEL_LEVEL = "text_model."


@dataclass
class Layer:
    """One adapted module. LoRA: `down`, `up`, `alpha`. LoHa/LoKr: `factors` by LyCORIS name."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None  # None: alpha = rank (scale 1)
    kind: str = "lora"  # "lora" | "loha" | "lokr"
    factors: dict[str, torch.Tensor] = field(default_factory=dict)

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


def strip_text_model(module: str) -> str:
    """`text_encoder.text_model.encoder...` -> `text_encoder.encoder...` (transformers 5 names)."""
    prefix = TEXT_ENCODER + "." + _TEXT_MODEL_LEVEL
    if module.startswith(prefix):
        return TEXT_ENCODER + "." + module[len(prefix) :]
    return module


def kohya_name(module: str) -> str:
    """The kohya name of a canonical module name (see the module docstring)."""
    part, _, path = module.partition(".")
    if part == UNET:
        return KOHYA_UNET_PREFIX + path.replace(".", "_")
    if part == TEXT_ENCODER:
        path = path.removeprefix(_TEXT_MODEL_LEVEL)
        return KOHYA_TEXT_PREFIX + KOHYA_TEXT_MODEL + path.replace(".", "_")
    raise SdtuneError(
        f"module '{module}' belongs to no known part (expected unet. or text_encoder.)"
    )


def kohya_table(modules: Iterable[str]) -> dict[str, str]:
    """kohya name -> canonical module name, for every module of a model (and the te1 alias)."""
    table = {}
    for module in modules:
        name = kohya_name(module)
        table[name] = module
        if name.startswith(KOHYA_TEXT_PREFIX):
            table["lora_te1_" + name[len(KOHYA_TEXT_PREFIX) :]] = module
    return table


def detect_layout(keys: Iterable[str]) -> str:
    """ "kohya", "peft" or "diffusers", from the key names; an error if none fits."""
    keys = list(keys)
    if any(k.startswith((KOHYA_UNET_PREFIX, "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return "peft"
    if any(k.startswith((UNET + ".", TEXT_ENCODER + ".")) for k in keys):
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
    for key, value in state.items():
        split = split_pair_key(key)
        if split is None:
            if "lora_magnitude_vector" in key or key.endswith(".alpha"):
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


def kohya_layer(name: str, tensors: dict[str, torch.Tensor]) -> Layer:
    """One kohya/LyCORIS module's tensors as a Layer (LoRA, LoCon, LoHa or LoKr)."""
    alpha = tensors.get("alpha")
    alpha = float(alpha.float().item()) if alpha is not None else None
    stems = {k.removesuffix(".weight") for k in tensors}
    bad = [k for k in stems if k.startswith(UNSUPPORTED_KEYS)]
    if bad or "dora_scale" in stems:
        what = "DoRA (dora_scale)" if "dora_scale" in stems else f"'{bad[0]}' (CP/Tucker, OFT)"
        raise SdtuneError(
            f"'{name}': {what} layers are not supported; plain LoRA/LoCon/LoHa/LoKr is"
        )
    if "lora_down" in stems and "lora_up" in stems:
        return Layer(tensors["lora_down.weight"], tensors["lora_up.weight"], alpha)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= stems:
        factors = {k: tensors[k] for k in LOHA_KEYS}
        return Layer(alpha=alpha, kind="loha", factors=factors)
    has_w1 = "lokr_w1" in stems or {"lokr_w1_a", "lokr_w1_b"} <= stems
    has_w2 = "lokr_w2" in stems or {"lokr_w2_a", "lokr_w2_b"} <= stems
    if has_w1 and has_w2:
        factors = {k: tensors[k] for k in LOKR_KEYS if k in tensors}
        return Layer(alpha=alpha, kind="lokr", factors=factors)
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


def to_kohya_state_dict(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """The kohya state dict of LoRA layers: down, up and the real alpha per module."""
    state = {}
    for module, layer in sorted(layers.items()):
        if layer.kind != "lora":
            raise SdtuneError(f"'{module}' is a {layer.kind} layer; convert it to LoRA first")
        name = kohya_name(module)
        alpha = float(layer.alpha) if layer.alpha is not None else float(layer.rank)
        state[name + KOHYA_DOWN] = layer.down.contiguous()
        state[name + KOHYA_UP] = layer.up.contiguous()
        state[name + KOHYA_ALPHA] = torch.tensor(alpha, dtype=layer.down.dtype)
    return state


def to_peft_state_dict(layers: dict[str, Layer]) -> dict[str, torch.Tensor]:
    """`unet.X.lora_A.weight` / `lora_B` keys with alpha folded into B (so scale is 1).

    This is what diffusers' `load_lora_weights` reads exactly without any metadata: with no
    alphas it uses alpha = rank per module.
    """
    state = {}
    for module, layer in layers.items():
        if layer.kind != "lora":
            raise SdtuneError(f"'{module}' is a {layer.kind} layer; convert it to LoRA first")
        state[f"{module}.lora_A.weight"] = layer.down.contiguous()
        state[f"{module}.lora_B.weight"] = (layer.up * layer.scale).contiguous()
    return state


def match_pattern(module: str, patterns: dict[str, float]) -> float | None:
    """PEFT's rank/alpha pattern rule: a key matches a module name that ends with it."""
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return None
