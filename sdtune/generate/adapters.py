"""Adapters at inference after loading (`load_adapters`): reweight live, fuse, unload.

Live adapters are extra peft layers beside the base weights: switching or reweighting them is
instant and unloading removes them, leaving the base weights untouched (bit-exact). Fused
adapters are added into the weights for speed (no extra matmuls per layer); unfusing subtracts
them again, which restores the base up to float rounding (~1e-7 relative in fp32).
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import SdtuneError

# The models of a pipeline that adapters change: SDXL has a second text encoder.
ADAPTED_PARTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_names(pipe: Any) -> list[str]:
    """Names of the adapters loaded on `pipe` (adapter_0, adapter_1, ... from load_adapters)."""
    names: set[str] = set()
    for adapters in pipe.get_list_adapters().values():
        names.update(adapters)
    return sorted(names)


def is_fused(pipe: Any) -> bool:
    """Whether any adapter is fused into the weights (read from the peft layers themselves,
    so it holds for every pipeline sharing these models through `from_pipe`)."""
    models = [getattr(pipe, name, None) for name in ADAPTED_PARTS]
    return any(
        getattr(module, "merged_adapters", None)
        for model in models
        if model is not None
        for module in model.modules()
    )


def set_adapter_weights(pipe: Any, weights: list[float] | dict[str, float]) -> None:
    """Reweight live adapters without reloading anything (a weight of 0 switches one off)."""
    names = adapter_names(pipe)
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise SdtuneError(f"no adapter named {unknown[0]}; loaded: {', '.join(names)}")
        chosen = list(weights)
        values = [weights[n] for n in chosen]
    else:
        if len(weights) != len(names):
            raise SdtuneError(f"{len(weights)} weights given for {len(names)} loaded adapters")
        chosen, values = names, list(weights)
    if is_fused(pipe):
        raise SdtuneError("adapters are fused into the weights; unfuse them before reweighting")
    pipe.set_adapters(chosen, values)


def fuse_adapters(pipe: Any) -> None:
    """Add the active adapters, with their weights, into the base weights."""
    names = adapter_names(pipe)
    if names and not is_fused(pipe):
        pipe.fuse_lora(adapter_names=names)


def unfuse_adapters(pipe: Any) -> None:
    """Subtract fused adapters from the weights again; they stay loaded, live."""
    if is_fused(pipe):
        pipe.unfuse_lora()


def unload_adapters(pipe: Any) -> None:
    """Remove every adapter (unfusing first if fused): the base model as it was loaded."""
    unfuse_adapters(pipe)
    pipe.unload_lora_weights()
