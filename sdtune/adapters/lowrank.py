"""Pure low-rank math: a layer's weight change, its exact LoRA form, and the best rank-k factors.

The truncated SVD gives the rank-k matrix nearest in Frobenius norm (Eckart-Young 1936), so
resizing, merging to a target rank and extracting from a fine-tune all use it. Convolution
changes are factored as (out) x (in * kh * kw) matrices: the down factor is then a kh x kw
convolution to `rank` channels and the up factor a 1x1 convolution, which is how kohya and PEFT
shape conv LoRA (LoCon).

LoHa and LoKr changes have an exact LoRA form that needs no SVD: the elementwise product of two
low-rank matrices is `(U1 * U2) (D1 * D2)` with row-wise and column-wise Khatri-Rao products
(rank r1 * r2), and a Kronecker product of factored halves is `kron(U1, U2) kron(V1, V2)` (the
mixed-product rule). Where that rank is no smaller than the change itself, the change is the
down factor and an identity the up factor. Either way the product equals the change up to float
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.adapters.formats import Layer
from sdtune.errors import SdtuneError

Pair = tuple[torch.Tensor, torch.Tensor]  # (up: out x r, down: r x fan_in), matrices


def _tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A Tucker core (r x r' x kh x kw) folded into its down factor (r' x in): r x in x kh x kw."""
    return torch.einsum("m n ..., n i -> m i ...", core.float(), down.float().flatten(1))


def _lora_pair(layer: Layer) -> Pair:
    down = layer.down.float()
    if "lora_mid" in layer.factors:  # LyCORIS LoCon with use_tucker
        down = _tucker_down(layer.factors["lora_mid"], down)
    return layer.up.float().flatten(1), down.flatten(1)


def _loha_pairs(layer: Layer) -> list[Pair]:
    """The two low-rank halves of a LoHa (Hyeon-Woo et al. 2022), Tucker cores folded in."""
    f = layer.factors
    pairs = []
    for i in ("1", "2"):
        a, b = f[f"hada_w{i}_a"].float(), f[f"hada_w{i}_b"].float()
        core = f.get(f"hada_t{i}")
        if core is None:  # a: out x r, b: r x (in * kh * kw)
            pairs.append((a, b.flatten(1)))
        else:  # a: r x out, b: r x in, core r x r x kh x kw
            pairs.append((a.T, _tucker_down(core, b).flatten(1)))
    return pairs


def _full_pair(matrix: torch.Tensor) -> Pair:
    """A full matrix as (identity, matrix) or (matrix, identity), whichever has the lower rank."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device), matrix
    return matrix, torch.eye(cols, dtype=matrix.dtype, device=matrix.device)


def _lokr_pairs(layer: Layer) -> list[Pair]:
    """The two Kronecker halves of a LoKr, each as a (possibly full-rank) pair of factors."""
    f = {k: v.float() for k, v in layer.factors.items()}
    first = _full_pair(f["lokr_w1"]) if "lokr_w1" in f else (f["lokr_w1_a"], f["lokr_w1_b"])
    if "lokr_w2" in f:
        second = _full_pair(f["lokr_w2"].flatten(1))
    else:
        second = (f["lokr_w2_a"], f["lokr_w2_b"].flatten(1))
    return [first, second]


def compute_out_in(layer: Layer) -> tuple[int, int]:
    """(out, in * kh * kw) of the weight a layer changes, read from its factors' shapes."""
    if layer.kind == "lora":
        fan_in = layer.down.flatten(1).shape[1]
        if "lora_mid" in layer.factors:
            fan_in *= layer.factors["lora_mid"].shape[2:].numel()
        return int(layer.up.shape[0]), int(fan_in)
    f = layer.factors
    if layer.kind == "loha":
        if "hada_t1" in f:
            out = f["hada_w1_a"].shape[1]
            return int(out), int(f["hada_w1_b"].shape[1] * f["hada_t1"].shape[2:].numel())
        return int(f["hada_w1_a"].shape[0]), int(f["hada_w1_b"].flatten(1).shape[1])
    w1 = (
        f["lokr_w1"].shape if "lokr_w1" in f else (f["lokr_w1_a"].shape[0], f["lokr_w1_b"].shape[1])
    )
    if "lokr_w2" in f:
        w2 = (f["lokr_w2"].shape[0], f["lokr_w2"].flatten(1).shape[1])
    else:
        w2 = (f["lokr_w2_a"].shape[0], f["lokr_w2_b"].flatten(1).shape[1])
    return int(w1[0] * w2[0]), int(w1[1] * w2[1])


def _weight_shape(layer: Layer, shape) -> torch.Size:
    if shape is not None:
        return torch.Size(shape)
    if layer.shape is not None:
        return torch.Size(layer.shape)
    if layer.kind == "lora" and "lora_mid" not in layer.factors:
        return torch.Size((layer.up.shape[0], *layer.down.shape[1:]))
    raise SdtuneError(f"a {layer.algorithm} layer needs its module's weight shape")


def compute_delta(layer: Layer, shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
    """The weight change (fp32) a layer adds to a module whose weight has `shape` (default: the
    shape it was read against). DoRA's rescaling is not part of it: see `compute_adapted_weight`.
    """
    shape = _weight_shape(layer, shape)
    if layer.kind == "lora":
        up, down = _lora_pair(layer)
        delta = up @ down
    elif layer.kind == "loha":
        (u1, d1), (u2, d2) = _loha_pairs(layer)
        delta = (u1 @ d1) * (u2 @ d2)
    else:
        (u1, v1), (u2, v2) = _lokr_pairs(layer)
        delta = torch.kron(u1 @ v1, u2 @ v2)
    if delta.numel() != shape.numel():
        raise SdtuneError(
            f"adapter layer gives a {tuple(delta.shape)} change for weight {tuple(shape)}"
        )
    return delta.reshape(shape) * layer.scale


def compute_adapted_weight(
    layer: Layer, weight: torch.Tensor, multiplier: float = 1.0
) -> torch.Tensor:
    """The module weight with the layer applied at `multiplier` (fp32): `W + m * delta`, and for
    DoRA (Liu et al. 2024) that rescaled to the layer's magnitude per output row, as peft does."""
    adapted = weight.float() + multiplier * compute_delta(layer, weight.shape)
    if layer.magnitude is None:
        return adapted
    norm = adapted.flatten(1).norm(dim=1)
    ratio = layer.magnitude.float().to(norm.device) / norm
    return adapted * ratio.reshape(-1, *(1,) * (adapted.ndim - 1))


def compute_lora_factors(layer: Layer) -> Pair:
    """Exact (up, down) matrices of a layer's change without its scale; no SVD (module doc)."""
    if layer.kind == "lora":
        return _lora_pair(layer)
    if layer.kind == "loha":
        (u1, d1), (u2, d2) = _loha_pairs(layer)
        up = (u1[:, :, None] * u2[:, None, :]).flatten(1)
        down = (d1[:, None, :] * d2[None, :, :]).flatten(0, 1)
        return up, down
    (u1, v1), (u2, v2) = _lokr_pairs(layer)
    return torch.kron(u1, u2), torch.kron(v1, v2)


@dataclass
class Factorization:
    """A rank-k factorization of a change and how much of it the rank keeps."""

    layer: Layer
    energy: float  # sum of the kept squared singular values / sum of all (1.0: lossless)
    relative_error: float  # ||delta - approx||_F / ||delta||_F


def factorize(delta: torch.Tensor, rank: int, alpha: float | None = None) -> Factorization:
    """The best rank-`rank` LoRA layer of `delta` (truncated SVD), with `alpha` (default rank).

    The singular values are split evenly between the factors (sqrt each side), which keeps their
    magnitudes alike, as training would; the alpha / rank scale is divided back out of `up`.
    """
    matrix = delta.float().flatten(1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = max(1, min(rank, s.numel()))
    root = s[:k].sqrt()
    up = u[:, :k] * root
    down = root[:, None] * vh[:k]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    alpha = float(k) if alpha is None else float(alpha)
    up = up / (alpha / k)
    if delta.ndim == 4:
        down = down.reshape(k, *delta.shape[1:])
        up = up.reshape(delta.shape[0], k, 1, 1)
    return Factorization(Layer(down.contiguous(), up.contiguous(), alpha), energy, error)


def as_lora(layer: Layer, shape: torch.Size | tuple[int, ...] | None = None) -> Layer:
    """A LoRA layer (scale 1) with exactly the same change, built without an SVD.

    LoRA layers come back as they are; LoHa, LoKr and Tucker layers get their exact LoRA form,
    or the change itself as the down factor where that is no larger. DoRA magnitudes are kept.
    """
    if layer.kind == "lora" and "lora_mid" not in layer.factors:
        return layer
    shape = _weight_shape(layer, shape)
    out, fan_in = shape[0], shape[1:].numel()
    up, down = compute_lora_factors(layer)
    if up.shape[1] >= min(out, fan_in):
        delta = compute_delta(layer, shape).flatten(1)
        eye = torch.eye(min(out, fan_in), dtype=delta.dtype, device=delta.device)
        up, down = (eye, delta) if out <= fan_in else (delta, eye)
    else:
        up = up * layer.scale
    rank = up.shape[1]
    if len(shape) == 4:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(out, rank, 1, 1)
    return Layer(down.contiguous(), up.contiguous(), None, magnitude=layer.magnitude, shape=shape)
