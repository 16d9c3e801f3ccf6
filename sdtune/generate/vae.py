"""VAE tools: encode an image to its latent distribution, decode latents, measure the round trip.

Stable Diffusion works on latents 8x smaller per side with 4 channels: 48x fewer numbers than
the RGB image. How much the VAE loses in that squeeze bounds what any fine-tune can draw (small
text, faces far away), so users check it on their own images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.generate.inputs import ImageInput, read_image

LATENT_FILE_KEYS = ("mean", "variance")


@dataclass
class VaeEncoding:
    """The posterior N(mean, variance) of one image's latents, before SD's scaling factor."""

    mean: torch.Tensor  # (1, C, h, w)
    variance: torch.Tensor
    scaling_factor: float  # latents the U-Net sees = sample * scaling_factor

    def latents(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the mean, or a sample when a generator is given (as training does)."""
        z = self.mean
        if generator is not None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
            z = self.mean + self.variance.sqrt() * noise
        return z * self.scaling_factor


@dataclass
class VaeReport:
    """What the round trip image -> latents -> image keeps."""

    image_size: tuple[int, int]
    latent_shape: tuple[int, ...]
    compression_ratio: float  # RGB values per latent value
    mse: float  # on [0, 1] pixels
    psnr_db: float

    def format_table(self) -> str:
        rows = [
            ("image", f"{self.image_size[0]}x{self.image_size[1]}x3"),
            ("latents", "x".join(str(n) for n in self.latent_shape)),
            ("compression", f"{self.compression_ratio:g}x fewer values"),
            ("reconstruction MSE", f"{self.mse:.6f}"),
            ("reconstruction PSNR", f"{self.psnr_db:.2f} dB"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def vae_scale(vae: Any) -> int:
    """Pixels per latent along a side: 2 per downsampling (8 for SD, 4 for the x4 upscaler)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def image_to_tensor(image: Image.Image, scale: int) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1]; sides must be multiples of the VAE's scale."""
    if image.width % scale or image.height % scale:
        raise SdtuneError(
            f"image is {image.width}x{image.height}; the VAE needs sides that are multiples of "
            f"{scale}; crop or resize it"
        )
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@torch.no_grad()
def encode_image(vae: Any, image: ImageInput) -> VaeEncoding:
    """The latent distribution of `image` (a file or PIL image)."""
    pixels = image_to_tensor(read_image(image), vae_scale(vae))
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return VaeEncoding(
        mean=dist.mean.float().cpu(),
        variance=dist.var.float().cpu(),
        scaling_factor=float(vae.config.scaling_factor),
    )


@torch.no_grad()
def decode_to_image(vae: Any, latents: torch.Tensor) -> Image.Image:
    """The image of scaled latents (what the U-Net produces)."""
    scaled = latents / vae.config.scaling_factor
    pixels = vae.decode(scaled.to(device=vae.device, dtype=vae.dtype)).sample[0].float().cpu()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def reconstruction_report(vae: Any, image: ImageInput) -> tuple[VaeReport, Image.Image]:
    """Encode (posterior mean) and decode `image`; the error of the round trip and its image."""
    original = read_image(image)
    encoding = encode_image(vae, original)
    restored = decode_to_image(vae, encoding.latents())
    a = np.asarray(original, dtype=np.float64) / 255.0
    b = np.asarray(restored, dtype=np.float64) / 255.0
    mse = float(np.mean((a - b) ** 2))
    report = VaeReport(
        image_size=original.size,
        latent_shape=tuple(encoding.mean.shape[1:]),
        compression_ratio=a.size / encoding.mean.numel(),
        mse=mse,
        psnr_db=10 * math.log10(1.0 / mse) if mse > 0 else math.inf,
    )
    return report, restored


def save_latents(encoding: VaeEncoding, path: str | Path) -> Path:
    """Mean and variance to a new .safetensors file (an existing file is never replaced)."""
    from safetensors.torch import save

    path = Path(path)
    data = save(
        {"mean": encoding.mean.contiguous(), "variance": encoding.variance.contiguous()},
        metadata={"scaling_factor": str(encoding.scaling_factor), "generator": "sdtune"},
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as handle:
            handle.write(data)
    except FileExistsError:
        raise SdtuneError(f"{path} already exists; choose another --out") from None
    return path


def load_latents(path: str | Path) -> VaeEncoding:
    """A file written by `save_latents`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in LATENT_FILE_KEYS}
    except Exception as exc:  # safetensors has its own error types; a missing key is a KeyError
        raise SdtuneError(
            f"'{path}' is not a latents file written by `sdtune vae encode` ({exc})"
        ) from None
    return VaeEncoding(
        tensors["mean"], tensors["variance"], float(meta.get("scaling_factor", 0.18215))
    )
