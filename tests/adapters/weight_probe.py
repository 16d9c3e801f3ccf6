"""The weight change a module applies, measured through its own forward pass.

Whatever wraps a Linear or Conv2d (a peft LoRA/DoRA layer, LyCORIS' replaced forward, nothing),
its output is affine in its input, so probing it with one-hot inputs recovers the weight it
effectively uses. Comparing that with the base weight gives the change each loader applies,
measured the same way for the producer's own model and for sdtune's, live or fused.
"""

from __future__ import annotations

import torch

from sdtune.adapters.formats import PARTS, strip_text_model


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


@torch.no_grad()
def effective_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight `module` applies (its output minus its output at zero input, per one-hot)."""
    base = base_layer(module)
    if isinstance(base, torch.nn.Linear):
        eye = torch.eye(base.in_features)
        return (module(eye) - module(torch.zeros(1, base.in_features))).T
    (kh, kw), (sh, sw), (ph, pw) = base.kernel_size, base.stride, base.padding
    rows, cols = sh - ph, sw - pw  # where output pixel (1, 1) starts reading the input
    n = base.in_channels * kh * kw
    probe = torch.zeros(n, base.in_channels, rows + kh + 1, cols + kw + 1)
    index = torch.arange(n)
    channel, rest = index // (kh * kw), index % (kh * kw)
    probe[index, channel, rows + rest // kw, cols + rest % kw] = 1.0
    out = module(probe)[:, :, 1, 1] - module(torch.zeros_like(probe[:1]))[:, :, 1, 1]
    return out.T.reshape(base.out_channels, base.in_channels, kh, kw)


def canonical_modules(pipe) -> dict[str, torch.nn.Module]:
    """Canonical name (`unet.X`, `text_encoder.Y`) -> the module at that path (wrapped or not)."""
    found = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        for name, module in model.named_modules() if model is not None else ():
            if isinstance(base_layer(module), (torch.nn.Linear, torch.nn.Conv2d)):
                if ".base_layer" in name or ".lora_" in name:
                    continue
                found[strip_text_model(f"{part}.{name}")] = module
    return found


def applied_changes(pipe, base: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """Per module in `names`: the weight its forward applies now minus its base weight."""
    modules = canonical_modules(pipe)
    return {name: effective_weight(modules[name]) - base[name] for name in names}


def stored_changes(pipe, base: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """Per module in `names`: its stored (fused) weight minus its base weight."""
    modules = canonical_modules(pipe)
    return {name: base_layer(modules[name]).weight.detach() - base[name] for name in names}


def base_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        name: base_layer(m).weight.detach().clone() for name, m in canonical_modules(pipe).items()
    }


def changed_modules(pipe, base: dict[str, torch.Tensor]) -> set[str]:
    """Modules whose stored weight differs from `base` (what fusing touched)."""
    return {
        name
        for name, m in canonical_modules(pipe).items()
        if not torch.equal(base_layer(m).weight, base[name])
    }


def relative_errors(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
) -> dict[str, float]:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:5]
    return {
        name: float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30))
        for name in want
    }
