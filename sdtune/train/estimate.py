"""Predicted peak accelerator memory of a training run, before any weight is loaded.

The static parts are counted: the frozen base in the run's precision, the LoRA weights, their
fp32 gradients and the optimizer state. What a step adds on top is measured, not guessed: the
run's models are built on the meta device (shapes only, nothing allocated, nothing downloaded),
one training step (VAE encode unless latents are cached, text encoder, U-Net, loss, backward)
runs there, and every tensor the step creates is followed from its allocation to its release.
That honours gradient checkpointing (recomputation happens in the simulated backward too) and
the fused attention kernels: attention keeps q, k, v, the output and the log-sum-exp for
backward, as the flash/memory-efficient kernels do on a GPU, never the full score matrix.
Autocast has no meta backend, so under mixed precision its casts are applied by hooks instead.
Allocator fragmentation and library workspaces (cuBLAS, cuDNN) are not tensors and are not
counted, so a measured `torch.cuda.max_memory_allocated` is expected a little above the total.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sdtune.config import RunConfig
from sdtune.data.prompts import Conditioning
from sdtune.errors import SdtuneError
from sdtune.models.components import Components
from sdtune.models.families import SDXL_TIME_IDS
from sdtune.train.parts import text_encoder_loras

logger = logging.getLogger("sdtune.train")

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS = 77  # CLIP's text window: every caption is padded to it
GIB = 2**30
# bitsandbytes keeps 8-bit state only for tensors of at least this many elements, in blocks of
# 256 values that each carry one fp32 scale; smaller tensors keep fp32 state.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256


@dataclass
class MemoryEstimate:
    """Bytes of each part of a run's peak memory on the accelerator."""

    weights: int  # the frozen base (U-Net, VAE, text encoder) in the run's precision
    lora: int  # trainable adapter weights, fp32
    optimizer: int  # optimizer state of the trainable weights (and their EMA, if any)
    activations: int  # what one micro-batch's forward keeps alive for its backward
    backward: int  # the step's peak above that: fp32 gradients and tensors in flight

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.optimizer + self.activations + self.backward

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("lora", self.lora),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("grads+temps", self.backward),
            ("total", self.total),
        ]


def format_estimate(estimate: MemoryEstimate, title: str = "") -> str:
    """The estimate as a small table in GiB (and MiB, so tiny models show something)."""
    lines = [title] if title else []
    lines.append(f"{'part':<14}{'GiB':>10}{'MiB':>12}")
    for name, size in estimate.rows():
        lines.append(f"{name:<14}{size / GIB:>10.2f}{size / 2**20:>12.1f}")
    return "\n".join(lines)


def compute_optimizer_bytes(name: str, params: list[torch.Tensor]) -> int:
    """Optimizer state bytes for `params` (shapes only; meta tensors are fine).

    AdamW keeps two fp32 moments; the 8-bit optimizers one byte per moment plus a block scale
    and a shared code map (bitsandbytes, tensors of >= 4096 elements only); Lion one moment; SGD one momentum;
    Adafactor (no first moment) a row and a column of second-moment statistics per matrix.
    """
    total = 0
    if name in ("adamw8bit", "lion8bit") and any(p.numel() >= BNB_MIN_8BIT_SIZE for p in params):
        total += (2 if name == "adamw8bit" else 1) * 4 * 256  # one shared fp32 code map each
    for p in params:
        n = p.numel()
        if name == "adamw":
            total += 8 * n
        elif name == "sgd":
            total += 4 * n
        elif name in ("adamw8bit", "lion8bit"):
            moments = 2 if name == "adamw8bit" else 1
            quantized = n >= BNB_MIN_8BIT_SIZE
            per_moment = n + 4 * math.ceil(n / BNB_BLOCK) if quantized else 4 * n
            total += moments * per_moment
        elif name == "adafactor":
            factored = p.dim() >= 2
            total += 4 * (n // p.shape[-1] + n // p.shape[-2] if factored else n)
        else:
            raise SdtuneError(f"no memory model for train.optimizer={name!r}")
    return total


class LiveTensorBytes(TorchDispatchMode):
    """Follows every storage that ops create, from allocation to release; keeps the peak.

    Storages that exist before the mode starts (the weights) are not counted. A storage is
    released when its last tensor dies, which Python reports through a weak reference.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._sizes or key in _preexisting:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


_preexisting: set[int] = set()  # storages of the weights while a simulation runs


@contextlib.contextmanager
def fused_attention_on_meta():
    """Route scaled-dot-product attention on meta tensors through the fused (flash) kernel.

    On meta, SDPA falls back to the math path, which materialises the B x H x L x L score
    matrix; GPUs run a fused kernel that keeps only q, k, v, the output and the log-sum-exp.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if query.device.type != "meta" or kw.get("enable_gqa"):
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        if attn_mask is not None:
            attn_mask = attn_mask.to(query.dtype)
        return flash(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@contextlib.contextmanager
def autocast_on_meta(models, dtype: torch.dtype, fp32_norms: bool = True):
    """What CUDA autocast does to the tensors a step keeps, for meta tensors (autocast has no
    meta backend): convolutions and linear layers take `dtype` inputs, group and layer norms
    run in fp32 (CUDA's policy; `fp32_norms=False` is the CPU's), and each LoRA down-projection
    gets its own copy of its input (peft casts it to the fp32 adapter's dtype, autocast back).
    Expects the adapter already cast to `dtype`; the norms' weights are fp32 only meanwhile."""
    if dtype == torch.float32:
        yield
        return
    from peft.tuners.lora import LoraLayer

    def cast(module, args, to):
        return tuple(
            a.to(to) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
        )

    down = {
        id(a)
        for m in models
        for layer in m.modules()
        if isinstance(layer, LoraLayer)
        for a in layer.lora_A.values()
    }
    hooks, norms = [], []
    for model in models:
        for m in model.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and fp32_norms:
                norms += [(p, p.data) for p in m.parameters(recurse=False)]
                hooks.append(m.register_forward_pre_hook(lambda m, a: cast(m, a, torch.float32)))
            elif id(m) in down:  # x -> fp32 (peft) -> dtype (autocast): a new tensor
                hooks.append(
                    m.register_forward_pre_hook(
                        lambda m, a: cast(m, cast(m, a, torch.float32), dtype)
                    )
                )
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                hooks.append(m.register_forward_pre_hook(lambda m, a: cast(m, a, dtype)))
    for p, data in norms:
        p.data = data.float()
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for p, data in norms:
            p.data = data


def resolve_family_name(cfg: RunConfig) -> str:
    """The run's model family from the config alone: model.family, or the folder's configs (a
    local folder or a hub model already in the local cache), or a single file's header, or the
    family of a published base model's hub id."""
    from sdtune.models.families import FAMILIES, detect_family_from_folder, known_hub_family

    if cfg.model.family:
        return cfg.model.family
    path = Path(cfg.model.path)
    if path.is_dir():
        return detect_family_from_folder(path).name
    if path.is_file():
        from sdtune.models.original_layout import (
            detect_family_from_checkpoint,
            read_checkpoint_info,
        )

        return detect_family_from_checkpoint(read_checkpoint_info(path)).name
    cached = _cached_hub_folder(cfg.model.path)
    if cached is not None:
        return detect_family_from_folder(cached).name
    known = known_hub_family(cfg.model.path)
    if known is not None:
        return known
    raise SdtuneError(
        f"cannot tell the family of model.path '{cfg.model.path}' without loading it; "
        f"set model.family (one of {', '.join(FAMILIES)})"
    )


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub model, if it was downloaded before (never the network)."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repository name
        return None
    return folder if (folder / "model_index.json").is_file() else None


def build_meta_pipeline(family: str) -> Any:
    """The family's full-size pipeline with every weight and buffer on the meta device."""
    from sdtune.models.families import build_pipeline_from_config

    pipe = build_pipeline_from_config(family, empty=True)
    return pipe.to("meta")


def estimate_memory(cfg: RunConfig, pipe: Any = None, fp32_norms: bool = True) -> MemoryEstimate:
    """Predicted peak memory of training `cfg`; `pipe` (meta weights) defaults to the
    full-size architecture of the run's family. The pipeline gets LoRA adapters added.
    `fp32_norms` follows CUDA autocast (False: CPU autocast, which keeps norms in half)."""
    from sdtune.models.families import detect_family
    from sdtune.train.setup import (
        TRAINABLE_FAMILIES,
        add_lora_adapters,
        enable_gradient_checkpointing,
        resolve_mixed_precision,
    )

    if pipe is None:
        family = resolve_family_name(cfg)
        if family not in TRAINABLE_FAMILIES:
            raise SdtuneError(
                f"training a LoRA on the '{family}' family is not supported yet, so there is "
                f"nothing to estimate; supported: {', '.join(TRAINABLE_FAMILIES)}"
            )
        pipe = build_meta_pipeline(family)
    dtype = HALF_DTYPES.get(resolve_mixed_precision(cfg.train.mixed_precision), torch.float32)
    family = detect_family(pipe)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
        if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            pipe.vae.to(torch.float32)  # as training keeps it (SDXL's VAE overflows in fp16)
    parts = Components.of(pipe, family).models
    weights = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    groups = add_lora_adapters(pipe, cfg, family)
    trainable = [p for g in groups for p in g["params"]]
    lora = sum(4 * p.numel() for p in trainable)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, [t.part for t in text_encoder_loras(cfg, family)])
    # Under autocast the fp32 adapter computes in the half dtype; on meta (no autocast) the
    # adapter is cast instead, so its inputs are saved in the half dtype as on the GPU.
    for p in trainable:
        p.data = p.data.to(dtype)
    extra_channels = family.extra_in_channels
    saved, peak, grads = simulate_step(pipe, cfg, dtype, extra_channels, fp32_norms)
    return MemoryEstimate(
        weights=weights,
        lora=lora,
        # An adapter EMA keeps an fp32 copy of the adapter beside the optimizer state.
        optimizer=compute_optimizer_bytes(cfg.train.optimizer, trainable)
        + (lora if cfg.train.ema_decay else 0),
        activations=saved,
        # The simulated gradients had the compute dtype; the real ones are fp32.
        backward=peak - saved + (lora - grads),
    )


def simulate_step(
    pipe, cfg: RunConfig, dtype: torch.dtype, extra_channels: int, fp32_norms: bool = True
):
    """One training step on `pipe`'s device, under autocast's casts when `dtype` is a half
    type; returns (bytes alive after the forward, peak bytes of the step, bytes of the
    gradients it left), counting only what the step allocated."""
    with autocast_on_meta(tuple(Components.of(pipe).models), dtype, fp32_norms):
        return _simulate_step(pipe, cfg, dtype, extra_channels)


def _simulate_step(pipe, cfg: RunConfig, dtype: torch.dtype, extra_channels: int):
    global _preexisting
    parts = Components.of(pipe)
    unet, vae, encoders = parts.unet, parts.vae, parts.text_encoders
    device, batch = unet.device, cfg.train.batch_size
    latent_side = cfg.data.resolution // pipe.vae_scale_factor
    _preexisting = {
        t.untyped_storage()._cdata for m in parts.models for t in [*m.parameters(), *m.buffers()]
    }
    trained = [t.part for t in text_encoder_loras(cfg, parts.family)]
    trains_text = bool(trained)
    unet.train()
    for name, encoder in zip(parts.family.text_encoders, encoders, strict=True):
        encoder.train(name in trained)
    tracker = LiveTensorBytes()
    try:
        with fused_attention_on_meta(), tracker:
            latent_shape = (batch, vae.config.latent_channels, latent_side, latent_side)
            if cfg.data.cache_latents:  # the posterior's mean and std, read from disk
                mean = torch.empty(latent_shape, device=device, dtype=dtype)
                std = torch.empty_like(mean)
            else:
                side = cfg.data.resolution
                pixels = torch.empty(batch, 3, side, side, device=device, dtype=vae.dtype)
                with torch.no_grad():
                    posterior = vae.encode(pixels).latent_dist
                mean, std = posterior.mean, posterior.std
                del pixels, posterior
            latents = (mean + std * torch.randn_like(mean)).to(dtype)
            del mean, std
            noise = torch.randn_like(latents)
            noisy = latents + noise
            if extra_channels:  # the family's inputs beside the latents (inpainting: mask + image)
                shape = (batch, extra_channels, latent_side, latent_side)
                extra = torch.empty(shape, device=device, dtype=dtype)
                noisy = torch.cat([noisy, extra], 1)
            timesteps = torch.zeros(batch, dtype=torch.long, device=device)
            tokens = TOKENS * (getattr(cfg.data, "max_token_length", 75) // 75)  # windows of 75
            if getattr(cfg.data, "cache_text_embeddings", False) and not trains_text:
                width = unet.config.cross_attention_dim  # the embeddings, read from disk
                text = torch.empty(batch, tokens, width, device=device, dtype=dtype)
                pooled = None
                if parts.family.is_xl:
                    pooled_width = encoders[-1].config.projection_dim
                    pooled = torch.empty(batch, pooled_width, device=device, dtype=dtype)
                cond = Conditioning(text, pooled)
            else:
                ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
                cond = parts.encode({key: ids for key in parts.tokenizer_map})
            time_ids = None
            if parts.family.micro_conditioning:
                time_ids = torch.zeros(batch, SDXL_TIME_IDS, device=device, dtype=dtype)
            prediction = unet(noisy, timesteps, **cond.to(dtype).unet_kwargs(time_ids)).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            del noisy, cond, prediction, latents, noise
            saved = tracker.live
            loss.backward()
            del loss
            grads = sum(
                p.grad.untyped_storage().nbytes()
                for m in (unet, *encoders)
                for p in m.parameters()
                if p.grad is not None
            )
    finally:
        _preexisting = set()
    for m in (unet, *encoders):
        m.zero_grad(set_to_none=True)
    return saved, tracker.peak, grads


@dataclass(frozen=True)
class TargetDevice:
    """The machine a run is estimated for: an estimate is for the GPU the run will train on,
    which need not be the machine that runs the estimate."""

    kind: str  # "cuda" or "cpu"
    description: str
    memory_bytes: int | None = None  # the GPU's memory, when known
    bf16: bool = True  # what mixed_precision=auto means there: bf16 if it has it, else fp16
    here: bool = False  # this machine's own GPU (free memory can be read)


def parse_memory_size(text: str) -> int:
    """`24GB`, `24G`, `24GiB`, `80` (GiB) or `12288MB` in bytes; GPUs sold as "24 GB" hold
    24 GiB."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(gi?b?|mi?b?)?\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise SdtuneError(f"--gpu takes a memory size such as 24GB or 16GiB; got '{text}'")
    unit = 2**20 if (match.group(2) or "g").startswith("m") else GIB
    return int(float(match.group(1)) * unit)


def resolve_target(device: str | None = None, gpu: str | None = None) -> TargetDevice:
    """The target from `--device` / `--gpu`; without them this machine's GPU, or, on a machine
    without one, a CUDA GPU with bf16 (any since Ampere) of unknown memory."""
    if device not in (None, "cuda", "cpu"):
        raise SdtuneError(f"--device must be cuda or cpu; got '{device}'")
    if device == "cpu":
        if gpu is not None:
            raise SdtuneError("--gpu describes a CUDA GPU; drop it or --device cpu")
        return TargetDevice("cpu", "the CPU")
    if gpu is not None:
        size = parse_memory_size(gpu)
        return TargetDevice("cuda", f"a CUDA GPU with {size / GIB:.1f} GiB and bf16", size)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        name = torch.cuda.get_device_name()
        bf16 = torch.cuda.is_bf16_supported()
        return TargetDevice("cuda", f"this machine's {name}", total, bf16, here=True)
    return TargetDevice("cuda", "a CUDA GPU with bf16 (none here: --gpu 24GB says which)")


def precision_on(value: str, target: TargetDevice) -> str:
    """train.mixed_precision on the target: `auto` as the run would resolve it there."""
    if value != "auto":
        return value
    if target.kind == "cpu":
        return "no"
    return "bf16" if target.bf16 else "fp16"


def device_memory_line(estimate: MemoryEstimate, target: TargetDevice) -> tuple[str, bool]:
    """A line comparing the estimate with the target GPU's memory, and whether it does not fit."""
    need = estimate.total / GIB
    if target.memory_bytes is None:
        what = "the CPU" if target.kind == "cpu" else "the target GPU"
        return f"{what}'s memory is unknown: pass --gpu 24GB to compare", False
    total = target.memory_bytes
    name = target.description
    if estimate.total > total:
        return (
            f"warning: predicted peak {need:.2f} GiB exceeds {name}'s {total / GIB:.1f} GiB; "
            "try train.gradient_checkpointing=true, train.optimizer=adamw8bit, "
            "data.cache_latents=true or a smaller train.batch_size"
        ), True
    free = f", {torch.cuda.mem_get_info()[0] / GIB:.1f} GiB free now" if target.here else ""
    return f"fits {name}: {total / GIB:.1f} GiB in all{free}", False


def log_predicted_peak(cfg: RunConfig, family: str) -> float | None:
    """One line at the start of a GPU run, and the predicted peak in GiB; an estimate that
    fails never stops training (None)."""
    try:
        estimate = estimate_memory(cfg, build_meta_pipeline(family))
        line, _ = device_memory_line(estimate, resolve_target())
    except Exception as exc:  # the estimate is advice; the run itself is what matters
        logger.info("memory estimate unavailable (%s)", exc)
        return None
    logger.info("predicted peak GPU memory %.2f GiB (%s)", estimate.total / GIB, line)
    return estimate.total / GIB
