"""Device, precision and speed settings for inference.

On CUDA the weights are fp16 (or bf16) and attention runs through PyTorch's fused SDPA kernels.
The SD VAE decoder overflows in fp16 (NaN or black images, worst with the SD 2 VAE), so with
fp16 weights the VAE stays fp32: hooks cast its inputs up and its latents back down, so the
pipelines, which hand the VAE tensors of the U-Net's dtype, need no change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdtune.errors import SdtuneError

logger = logging.getLogger("sdtune.generate")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(requested: str | None) -> torch.device:
    """The requested device, or CUDA when present, else the CPU; a clear error for absent CUDA."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SdtuneError(f"unknown device '{requested}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtuneError(
            f"--device {requested} was asked for but CUDA is not available here; use cpu"
        )
    return device


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless `requested` (fp32, fp16, bf16) says otherwise."""
    if requested is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES.get(requested.lower())
    if dtype is None:
        raise SdtuneError(f"unknown dtype '{requested}'; valid dtypes: {', '.join(DTYPES)}")
    if dtype == torch.float16 and device.type == "cpu":
        logger.warning("fp16 on the CPU is slow and poorly supported; bf16 or fp32 are better")
    return dtype


def keep_vae_in_fp32(vae: Any) -> list:
    """Run the VAE in fp32 inside a half-precision pipeline (see the module docstring); returns
    the hooks' handles (`vae_in_fp32` removes them again)."""
    if getattr(vae, "_sdtune_fp32", False):
        return []

    def cast_in(module: Any, args: tuple) -> tuple:
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def remember_dtype(module: Any, args: tuple) -> tuple:
        module._sdtune_in_dtype = args[0].dtype
        return cast_in(module, args)

    def cast_back(module: Any, args: tuple, output: Any) -> Any:
        return output.to(vae.encoder._sdtune_in_dtype)

    vae.to(torch.float32)
    handles = [vae.encoder.register_forward_pre_hook(remember_dtype)]
    if vae.quant_conv is not None:
        handles.append(vae.quant_conv.register_forward_hook(cast_back))
    else:
        handles.append(vae.encoder.register_forward_hook(cast_back))
    first_decode = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    handles.append(first_decode.register_forward_pre_hook(cast_in))
    vae._sdtune_fp32 = True
    return handles


@contextmanager
def vae_in_fp32(vae: Any) -> Iterator[None]:
    """`keep_vae_in_fp32` for the length of a `with` block: afterwards the VAE is back in its
    own dtype (fp16 -> fp32 -> fp16 is exact) and the hooks are gone."""
    dtype = vae.dtype
    handles = keep_vae_in_fp32(vae)
    try:
        yield
    finally:
        if handles:
            for handle in handles:
                handle.remove()
            vae._sdtune_fp32 = False
            vae.to(dtype)


def use_sdpa_attention(unet: Any) -> None:
    """PyTorch's fused attention (flash / memory-efficient kernels on CUDA)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())


def place_pipeline(
    pipe: Any,
    device: torch.device,
    dtype: torch.dtype,
    *,
    vae_fp32: bool | None = None,
    channels_last: bool = False,
    cpu_offload: bool = False,
) -> Any:
    """Move `pipe` to `device` and `dtype` with the chosen speed settings; returns `pipe`."""
    pipe.to(dtype=dtype)
    if vae_fp32 if vae_fp32 is not None else dtype == torch.float16:
        keep_vae_in_fp32(pipe.vae)
    if device.type == "cuda":
        use_sdpa_attention(pipe.unet)
    if channels_last:  # NHWC convolutions: faster on tensor cores
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if cpu_offload:
        if device.type != "cuda":
            raise SdtuneError("--cpu-offload needs a CUDA device; drop it on the CPU")
        pipe.enable_model_cpu_offload(device=device)  # each model moves to the GPU when used
    else:
        pipe.to(device)
    return pipe


def compile_unet(pipe: Any) -> None:
    """`torch.compile` the U-Net. Fuse adapters first: live LoRA layers add graph breaks and
    switching their weights would recompile."""
    pipe.unet = torch.compile(pipe.unet)
