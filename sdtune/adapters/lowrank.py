"""Pure low-rank math: a layer's weight change, and the best rank-k factors of a change.

The truncated SVD gives the rank-k matrix nearest in Frobenius norm (Eckart-Young 1936), so
resizing, merging to a target rank and extracting from a fine-tune all use it. Convolution
changes are factored as (out) x (in * kh * kw) matrices: the down factor is then a kh x kw
convolution to `rank` channels and the up factor a 1x1 convolution, which is how kohya and PEFT
shape conv LoRA (LoCon).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.adapters.formats import Layer
from sdtune.errors import SdtuneError


def _lora_delta(layer: Layer) -> torch.Tensor:
    down, up = layer.down.float(), layer.up.float()
    product = up.flatten(1) @ down.flatten(1)
    if down.ndim == 4:  # conv: down r x in x kh x kw, up out x r x 1 x 1
        product = product.reshape(up.shape[0], *down.shape[1:])
    return product * layer.scale


def _loha_delta(layer: Layer, shape: torch.Size) -> torch.Tensor:
    """LoHa (Hyeon-Woo et al. 2022): (w1a @ w1b) * (w2a @ w2b), elementwise, times alpha / rank."""
    f = {k: v.float() for k, v in layer.factors.items()}
    w1 = f["hada_w1_a"] @ f["hada_w1_b"].flatten(1)
    w2 = f["hada_w2_a"] @ f["hada_w2_b"].flatten(1)
    return (w1 * w2).reshape(shape) * layer.scale


def _lokr_delta(layer: Layer, shape: torch.Size) -> torch.Tensor:
    """LoKr (Kronecker product of two factors, each full or itself low-rank)."""
    f = {k: v.float() for k, v in layer.factors.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * layer.scale


def compute_delta(layer: Layer, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The weight change (fp32) a layer adds to a module whose weight has `shape`."""
    shape = torch.Size(shape)
    if layer.kind == "lora":
        delta = _lora_delta(layer)
    elif layer.kind == "loha":
        delta = _loha_delta(layer, shape)
    else:
        delta = _lokr_delta(layer, shape)
    if delta.numel() != shape.numel():
        raise SdtuneError(
            f"adapter layer gives a {tuple(delta.shape)} change for weight {tuple(shape)}"
        )
    return delta.reshape(shape)


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


def numerical_rank(delta: torch.Tensor, tolerance: float = 1e-6) -> int:
    """How many singular values exceed `tolerance` times the largest (at least 1)."""
    s = torch.linalg.svdvals(delta.float().flatten(1))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 1
    return max(1, int((s > s[0] * tolerance).sum()))


def as_lora(layer: Layer, shape: torch.Size | tuple[int, ...]) -> Layer:
    """A LoRA layer with the same change: itself, or a LoHa/LoKr factored at its exact rank."""
    if layer.kind == "lora":
        return layer
    delta = compute_delta(layer, shape)
    return factorize(delta, numerical_rank(delta)).layer
