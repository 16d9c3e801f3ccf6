"""Time turning one full-size LyCORIS LoHa / LoKr layer into what the loader hands diffusers.

    .venv/bin/python scripts/bench_lycoris_loading.py [--rank 16] [--repeat 3]

The layer is made by LyCORIS itself on a full-size SD 1 convolution (1280 x 1280 x 3 x 3, the
largest in the U-Net). "svd" is the earlier conversion (the layer's change, its numerical rank
by one SVD, then a truncated SVD at that rank); "exact" is `lowrank.as_lora` (Khatri-Rao /
Kronecker factors, no SVD). Prints seconds for each, their ratio, the rank each gives and the
relative error of each against the layer's change.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdtune.adapters.formats import kohya_layer
from sdtune.adapters.lowrank import as_lora, compute_delta, factorize


def _lycoris_layer(algo: str, rank: int, seed: int):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    conv = torch.nn.Conv2d(1280, 1280, 3, padding=1)
    module_type = {"loha": LohaModule, "lokr": LokrModule}[algo]
    module = module_type("bench", conv, 1.0, rank, rank / 2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    tensors = {k: v.detach() for k, v in module.custom_state_dict().items()}
    layer = kohya_layer("bench", tensors)
    layer.shape = conv.weight.shape
    return layer


def _svd_path(layer):
    delta = compute_delta(layer)
    s = torch.linalg.svdvals(delta.flatten(1))
    rank = max(1, int((s > s[0] * 1e-6).sum()))
    return factorize(delta, rank).layer


def _timed(fn, layer, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(layer)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16, help="LyCORIS dim of the layer")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (exact)")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    for algo in ("loha", "lokr"):
        layer = _lycoris_layer(algo, args.rank, seed=0)
        want = compute_delta(layer)
        svd_s, svd = _timed(_svd_path, layer, 1)
        exact_s, exact = _timed(as_lora, layer, args.repeat)
        for name, seconds, result in (("svd", svd_s, svd), ("exact", exact_s, exact)):
            error = float((compute_delta(result, want.shape) - want).norm() / want.norm())
            print(f"{algo} {name:>5}: {seconds:8.3f} s  rank {result.rank:5d}  error {error:.1e}")
        print(f"{algo} svd / exact: {svd_s / exact_s:.0f}x")


if __name__ == "__main__":
    main()
