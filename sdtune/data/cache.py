"""A disk cache of VAE encodings, so each training image is encoded once, not every epoch.

An entry is keyed on everything that determines it: the exact pixels the VAE would see (so the
file's content, crop, flip, bucket and resolution), the VAE (its config and a fingerprint of its
weights) and the dtype. A changed input re-encodes; a different VAE or precision uses other
entries, never a stale one. The entry holds the posterior's mean and standard deviation, not a
sample, so each step still draws its own latent sample from the item's seeded generator, exactly
as without the cache. Entries are written under a temporary name and renamed; a torn or foreign
entry is re-encoded and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDTUNE_CACHE", Path.home() / ".cache" / "sdtune")) / "latents"


def vae_fingerprint(vae) -> str:
    """The VAE's identity: its config and a hash of every weight (read once per run)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class LatentCache:
    def __init__(self, folder: str | Path, vae, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.vae = vae
        self.identity = f"{vae_fingerprint(vae)}:{dtype}"
        self.hits = self.misses = 0

    def _path(self, pixels: torch.Tensor) -> Path:
        digest = hashlib.sha256(self.identity.encode())
        digest.update(str(tuple(pixels.shape)).encode())
        digest.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        key = digest.hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                return f.get_tensor("mean"), f.get_tensor("std")
        except Exception:  # missing, torn or foreign: encode again
            return None

    def _write(self, path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            save_file(
                {"mean": mean.detach().cpu().contiguous(), "std": std.detach().cpu().contiguous()},
                str(tmp),
            )
            os.replace(tmp, path)
        except OSError:  # a full disk only costs speed: the run goes on uncached
            tmp.unlink(missing_ok=True)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each image's posterior, from the cache or the VAE."""
        paths = [self._path(p) for p in pixels]
        found = [self._read(p, pixels.device) for p in paths]
        missing = [i for i, entry in enumerate(found) if entry is None]
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            posterior = self.vae.encode(pixels[missing]).latent_dist
            for row, i in enumerate(missing):
                self._write(paths[i], posterior.mean[row], posterior.std[row])
                found[i] = (posterior.mean[row], posterior.std[row])
        # safetensors stores the exact bytes: a warm run reads what a cold run used.
        return torch.stack([m for m, _ in found]), torch.stack([s for _, s in found])
