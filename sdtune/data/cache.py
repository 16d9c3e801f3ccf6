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


def default_cache_dir(kind: str = "latents") -> Path:
    """~/.cache/sdtune/<kind> (or $SDTUNE_CACHE/<kind>): latents and text embeddings apart."""
    return Path(os.environ.get("SDTUNE_CACHE", Path.home() / ".cache" / "sdtune")) / kind


def module_fingerprint(module) -> str:
    """A model's identity: its config and a hash of every weight (read once per run).

    Config keys starting with "_" (where it was loaded from, library versions) are left out:
    the same weights loaded from another folder are the same model.
    """
    config = module.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {
        k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def entry_path(folder: Path, digest) -> Path:
    """Where the entry of a finished sha256 `digest` lives (256 sub-folders keep folders small)."""
    key = digest.hexdigest()
    return folder / key[:2] / f"{key}.safetensors"


def read_entry(path: Path, names: tuple[str, ...], device) -> tuple[torch.Tensor, ...] | None:
    """The named tensors of an entry, or None if it is missing, torn or foreign."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return tuple(f.get_tensor(name) for name in names)
    except Exception:  # safetensors raises its own error types: encode again
        return None


def write_entry(path: Path, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """Write under a temporary name, then rename: a reader never sees half an entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata
        )
        os.replace(tmp, path)
    except OSError:  # a full disk only costs speed: the run goes on uncached
        tmp.unlink(missing_ok=True)


def first_misses(paths: list[Path], found: list) -> list[int]:
    """Rows to encode: the first row of each missing entry (a batch may hold one twice)."""
    first: dict[Path, int] = {}
    for i, (path, entry) in enumerate(zip(paths, found, strict=True)):
        if entry is None:
            first.setdefault(path, i)
    return list(first.values())


def pixel_digest(pixels: torch.Tensor) -> str:
    """The identity of one image tensor: its shape and exact values (computed on the CPU, in
    the data loader, so a training step neither hashes nor copies pixels back from the GPU)."""
    digest = hashlib.sha256(str(tuple(pixels.shape)).encode())
    digest.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    def __init__(self, folder: str | Path, vae, dtype: torch.dtype) -> None:
        self.folder = Path(folder)
        self.vae = vae
        self.identity = f"{module_fingerprint(vae)}:{dtype}"
        self.hits = self.misses = 0

    def _path(self, pixel_key: str) -> Path:
        return entry_path(self.folder, hashlib.sha256(f"{self.identity}:{pixel_key}".encode()))

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, pixel_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of each image's posterior, from the cache or the VAE.

        `pixel_keys` are the images' `pixel_digest`s, as the data loader computed them from the
        float32 pixels; without them they are computed here.
        """
        keys = pixel_keys or [pixel_digest(p) for p in pixels]
        paths = [self._path(k) for k in keys]
        found = [read_entry(p, ("mean", "std"), pixels.device) for p in paths]
        missing = first_misses(paths, found)
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        if missing:
            posterior = self.vae.encode(pixels[missing]).latent_dist
            check_latents_finite(posterior.mean, self.vae)  # a NaN entry would be read forever
            for row, i in enumerate(missing):
                write_entry(paths[i], {"mean": posterior.mean[row], "std": posterior.std[row]})
                found[i] = (posterior.mean[row], posterior.std[row])
        for i, path in enumerate(paths):  # a repeat of an entry encoded in this batch
            if found[i] is None:
                found[i] = found[paths.index(path)]
        # safetensors stores the exact bytes: a warm run reads what a cold run used.
        return torch.stack([m for m, _ in found]), torch.stack([s for _, s in found])


def check_latents_finite(latents: torch.Tensor, vae) -> None:
    """Stop when the VAE encoded an image to NaN or infinite latents, instead of training on them.

    The usual cause is a VAE run in fp16 whose activations overflow (SDXL's does; its config
    says `force_upcast`, and sdtune keeps it in fp32 then).
    """
    bad = ~torch.isfinite(latents).flatten(1).all(dim=1)
    if not bool(bad.any()):
        return
    from sdtune.errors import SdtuneError

    dtype = str(next(vae.parameters()).dtype).removeprefix("torch.")
    raise SdtuneError(
        f"the VAE ({dtype}) encoded {int(bad.sum())} of {len(latents)} images of this batch to "
        "NaN or infinite latents, so nothing was trained on them; a VAE that overflows in "
        "float16 must run in float32 or bf16: use train.mixed_precision=bf16 (or no), or a "
        "model whose VAE is made for fp16"
    )
