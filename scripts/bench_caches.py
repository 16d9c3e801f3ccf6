"""Training speed with and without the latent and text-embedding caches, on a tiny SD 1.

    .venv/bin/python scripts/bench_caches.py [--steps 40] [--resolution 64]

Each setting trains once to fill its caches, then again with warm caches; the time of the
second run's steps (not model loading or the cache pass) is compared with the uncached run's,
and the adapters are compared with the uncached one (largest absolute difference).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

import sdtune.train.loop as loop
from sdtune.config import load_config
from sdtune.data.synthetic import write_shape_dataset
from sdtune.models.tiny import build_tiny_pipeline

SETTINGS = {
    "uncached": {},
    "text cache": {"data.cache_text_embeddings": True},
    "latent + text caches": {"data.cache_text_embeddings": True, "data.cache_latents": True},
}


def timed_train(cfg) -> tuple[float, Path]:
    """(seconds spent in the training steps, adapter path)."""
    spent = {}
    real = loop.run_steps

    def run_steps(run):
        start = time.perf_counter()
        try:
            return real(run)
        finally:
            spent["s"] = time.perf_counter() - start

    loop.run_steps = run_steps
    try:
        result = loop.train(cfg)
    finally:
        loop.run_steps = real
    return spent["s"], result.adapter_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_pipeline("sd1", seed=0).save_pretrained(root / "model")
        write_shape_dataset(root / "images", count=8, size=args.resolution, trigger="sks")
        results = {}
        for name, extra in SETTINGS.items():
            for attempt in ("fill", "warm"):
                values = {
                    "model.path": str(root / "model"),
                    "data.dir": str(root / "images"),
                    "data.resolution": args.resolution,
                    "data.cache_dir": str(root / "cache"),
                    "train.batch_size": 4,
                    "train.max_steps": args.steps,
                    "output.dir": str(root / f"{name}-{attempt}".replace(" ", "_")),
                    "output.log_with": "none",
                    **extra,
                }
                seconds, adapter = timed_train(load_config(None, values))
                if name == "uncached" or attempt == "warm":
                    results[name] = (seconds / args.steps, adapter)
                if name == "uncached":
                    break
        base_time, base_adapter = results["uncached"]
        base = load_file(str(base_adapter))
        for name, (per_step, adapter) in results.items():
            other = load_file(str(adapter))
            diff = max((base[k] - other[k]).abs().max().item() for k in base)
            print(
                f"{name:<22} {per_step * 1000:7.1f} ms/step  x{per_step / base_time:.2f} of "
                f"uncached  max |adapter - uncached| {diff:.2e}"
            )


if __name__ == "__main__":
    main()
