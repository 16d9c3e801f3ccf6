"""The training loop: a folder of captioned images and a base model in, a LoRA adapter out.

Read it top to bottom: check the inputs, load the model, add the LoRA, then for each step
encode -> noise -> predict -> loss -> update, checkpoint now and then, and finally save the
adapter beside the config. A run resumed from a checkpoint continues exactly where it stopped:
same data order, same random draws, same weights as a run that was never interrupted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from sdtune.config import RunConfig, config_to_dict
from sdtune.data.cache import LatentCache, check_latents_finite
from sdtune.data.prompts import Conditioning, compute_time_ids
from sdtune.data.sources import split_validation
from sdtune.data.text_cache import TextEmbeddingCache
from sdtune.errors import SdtuneError, first_line
from sdtune.models.components import Components
from sdtune.train import checkpoint as ckpt
from sdtune.train.cache_pass import log_cache_totals, open_caches, prebuild_caches
from sdtune.train.checkpoint import Progress
from sdtune.train.ema import AdapterEMA
from sdtune.train.estimate import log_predicted_peak
from sdtune.train.events import (
    CheckpointWritten,
    EventLog,
    Failed,
    Finished,
    SamplesWritten,
    Started,
    Stopped,
    StopRequest,
    Validated,
    format_duration,
    log_line_sink,
    progress_bar_sink,
    tracker_sink,
)
from sdtune.train.inpainting import build_inpainting_channels
from sdtune.train.objectives import (
    compute_loss,
    compute_min_snr_weights,
    compute_noisy_latents,
    compute_offset_noise,
    compute_target,
)
from sdtune.train.optim import build_optimizer
from sdtune.train.outputs import prepare_output_dir, remove_leftovers, write_run_id
from sdtune.train.parts import text_encoder_loras
from sdtune.train.prior import ensure_class_images, scan_class_images
from sdtune.train.reporting import StepLoss, log_step, progress_bar
from sdtune.train.resume import load_resume_point
from sdtune.train.sampling import save_samples
from sdtune.train.saving import (
    check_weights_finite,
    restore_checkpoint,
    save_checkpoint,
    save_final_files,
)
from sdtune.train.setup import (
    Objective,
    add_lora_adapters,
    build_dataloader,
    build_objective,
    check_inputs,
    check_model_fits,
    enable_gradient_checkpointing,
    load_base,
    resolve_mixed_precision,
    set_attention,
    trackers,
)
from sdtune.train.validation import (
    build_validation_loader,
    compute_validation_loss,
)

logger = logging.getLogger("sdtune.train")

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ETA_AFTER_STEPS = 3  # the start summary's time estimate comes from this many measured steps


@dataclass
class TrainResult:
    output_dir: Path
    adapter_path: Path
    steps: int
    last_loss: float
    pipeline: object  # the base pipeline with the trained adapter attached, ready to generate
    stopped: str | None = None  # why the run stopped early on request (adapter_path: None)


@dataclass
class Run:
    """The prepared parts of one training run."""

    cfg: RunConfig
    accelerator: Accelerator
    pipe: object
    family: object
    out: Path
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # by part name, in prompt order (SDXL: two)
    optimizer: object
    lr_scheduler: object
    loader: object
    sampler: object
    trainable: list[torch.nn.Parameter]
    objective: Objective
    dtype: torch.dtype
    ema: AdapterEMA | None = None
    validation: object = None  # loader of held-out images, when data.validation_split is set
    latent_cache: LatentCache | None = None  # VAE encodings on disk, when data.cache_latents
    text_cache: TextEmbeddingCache | None = None  # encoder outputs, data.cache_text_embeddings
    progress: Progress = field(default_factory=Progress)
    run_id: str = ""  # recorded in the run folder and in every checkpoint
    stopped: str | None = None  # set by run_steps when a stop request ended the run
    events: EventLog = field(default_factory=lambda: EventLog(None))
    stop: StopRequest | None = None  # asked to checkpoint and stop (STOP file, SIGTERM)
    trained_text_encoders: tuple[str, ...] = ()  # the parts with a LoRA of their own

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first text encoder (SD 1/2's only one)."""
        return next(iter(self.text_encoders.values()))

    @property
    def components(self) -> Components:
        return Components.of(self.pipe, self.family)


def item_generators(seed: int, draws: list[int], device) -> list[torch.Generator]:
    """One generator per item, seeded by the run seed and the item's (epoch, index) draw.

    Each image's VAE sample, noise and timestep then depend only on which item it is, not on
    how items are grouped: batch 4 equals 2 accumulated batches of 2 equals 2 processes of 2,
    and a resumed run draws exactly what the uninterrupted run drew.
    """
    return [torch.Generator(device).manual_seed(seed * 1_000_003 + d) for d in draws]


def _randn(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(like.shape, generator=generators, device=like.device, dtype=like.dtype)


def training_step(batch, run: Run, timestep: int | None = None) -> torch.Tensor:
    """One loss evaluation: encode, noise, predict, compare. Returns the scalar loss.

    `timestep` fixes the noise level of every item (validation); training draws one per item.
    """
    obj, vae = run.objective, run.pipe.vae
    pixels = batch["pixel_values"].to(vae.device, dtype=vae.dtype)  # fp32 for an fp16-unsafe VAE
    gens = item_generators(run.cfg.train.seed, batch["draws"], pixels.device)
    if run.latent_cache is not None:
        mean, std = run.latent_cache.encode(pixels, batch.get("pixel_keys"))
    else:
        with torch.no_grad():
            posterior = vae.encode(pixels).latent_dist
        mean, std = posterior.mean, posterior.std
        check_latents_finite(mean, vae)
    mean, std = mean.to(run.dtype), std.to(run.dtype)
    latents = (mean + std * _randn(mean, gens)) * vae.config.scaling_factor  # a posterior sample
    noise = _randn(latents, gens)
    if obj.noise_offset:
        noise = compute_offset_noise(noise, obj.noise_offset, _randn(latents[:, :, :1, :1], gens))
    steps = len(obj.alphas_cumprod)
    timesteps = torch.cat(
        [torch.randint(0, steps, (1,), generator=g, device=g.device) for g in gens]
    )
    if timestep is not None:
        timesteps = torch.full_like(timesteps, timestep)
    model_noise = noise
    if obj.input_perturbation:  # the input gets extra noise; the target stays the clean noise
        model_noise = noise + obj.input_perturbation * _randn(noise, gens)
    noisy = compute_noisy_latents(latents, model_noise, timesteps, obj.alphas_cumprod)
    if run.family.takes_inpaint_inputs:  # + mask + masked-image latents
        noisy = torch.cat([noisy, build_inpainting_channels(vae, pixels, gens, latents.shape)], 1)
    cond = _encode_text(run, batch, latents.device).to(run.dtype)
    time_ids = _time_ids(batch, pixels) if run.family.micro_conditioning else None
    prediction = run.unet(noisy, timesteps, **cond.unet_kwargs(time_ids)).sample
    target = compute_target(latents, noise, timesteps, obj.alphas_cumprod, obj.prediction_type)
    weights = torch.ones(len(latents), device=latents.device)
    if obj.min_snr_gamma:
        weights = compute_min_snr_weights(
            timesteps, obj.alphas_cumprod, obj.min_snr_gamma, obj.prediction_type
        )
    if "prior" in batch:
        # DreamBooth: mean instance loss + prior_loss_weight * mean class loss (equal halves).
        prior = batch["prior"].to(latents.device)
        weights = 2 * weights * torch.where(prior, run.cfg.train.prior_loss_weight, 1.0)
    return compute_loss(prediction, target, weights, obj.loss_type, obj.huber_c)


def _encode_text(run: Run, batch, device) -> Conditioning:
    """The captions' conditioning: read from the text cache when it is on, else encoded now
    (through the trained text-encoder LoRAs when there are any)."""
    if run.text_cache is not None:  # keyed on the loader's CPU token ids
        return run.text_cache.encode(batch["captions"], batch)
    parts = run.components
    ids = {key: batch[key].to(device) for key in parts.tokenizer_map}
    return parts.encode(ids, list(run.text_encoders.values()))


def _time_ids(batch, pixels: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning of each item: its real original size and crop (from the data
    pipeline, buckets included); items made without sizes count as uncropped originals."""
    if "original_size" in batch:
        sizes = (batch["original_size"], batch["crop_top_left"], batch["target_size"])
    else:
        side = torch.tensor([list(pixels.shape[-2:])] * len(pixels))
        sizes = (side, torch.zeros_like(side), side)
    return compute_time_ids(*sizes).to(pixels.device)


def train(cfg: RunConfig) -> TrainResult:
    """Run the training described by `cfg` and save the adapter; see the module docstring."""
    # The run folder is made only after the model loaded, so a wrong model path leaves
    # nothing behind that would block the retry. A resumed checkpoint is read and compared
    # with `cfg` before that, so a foreign one costs no model load and changes no file.
    report = check_inputs(cfg)
    cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision)
    resume = load_resume_point(cfg) if cfg.train.resume is not None else None
    pipe, family = load_base(cfg)
    check_model_fits(pipe, cfg)
    main = os.environ.get("RANK", "0") == "0"  # before the Accelerator: launchers set RANK
    out = prepare_output_dir(cfg.output.dir, cfg.output.overwrite, resume is not None, main)
    _forget_earlier_runs()
    accelerator = Accelerator(
        # Without CUDA, `cpu=True` lets accelerate see the processes torchrun or
        # `accelerate launch` started (gloo); otherwise each would train alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=trackers(cfg.output.log_with) or None,  # none: no tracker, no warning
        project_dir=str(out),
    )
    run_id = ""
    main = accelerator.is_main_process
    # Only the main process reports; every sink is fed from the same events.
    events = EventLog(out if main else None, [log_line_sink, tracker_sink(accelerator)] * main)
    peak = None
    if main:
        remove_leftovers(out)
        run_id = write_run_id(out, resume.run_id if resume else None)
        logger.info("data: %s", report.summary())
        if torch.cuda.is_available():  # predicted peak memory, before the model moves there
            peak = log_predicted_peak(cfg, family.name)
    started = time.perf_counter()
    with StopRequest(out) as stop:
        try:
            run = prepare_run(cfg, accelerator, pipe, family, out, report)
            run.run_id, run.events, run.stop = run_id, events, stop
            if resume is not None:
                restore_checkpoint(run, resume.folder, resume.state)
            events.emit(
                Started(
                    run.progress.step,
                    cfg.train.max_steps,
                    len(run.loader.dataset),
                    family.name,
                    config_to_dict(cfg),
                    peak,
                    str(resume.folder) if resume is not None else None,
                )
            )
            last_loss = run_steps(run)
            if run.stopped is not None:
                return _stop_here(run, last_loss)
            adapter_path = save_final(run)
        except Exception as exc:
            events.emit(Failed(run.progress.step if "run" in locals() else 0, first_line(exc)))
            raise
    events.emit(
        Finished(run.progress.step, str(adapter_path), last_loss, time.perf_counter() - started)
    )
    accelerator.end_training()
    return TrainResult(out, adapter_path, run.progress.step, last_loss, pipe)


def _stop_here(run: Run, last_loss: float) -> TrainResult:
    """Asked to stop: a checkpoint of this very step (unless one was just written), then out."""
    path = _checkpoint(run)  # replaces a checkpoint of the same step, if one was just written
    run.events.emit(Stopped(run.progress.step, str(path) if path else None, run.stopped))
    run.accelerator.end_training()
    return TrainResult(run.out, None, run.progress.step, last_loss, run.pipe, run.stopped)


def _forget_earlier_runs() -> None:
    """accelerate keeps its settings in process-wide state and refuses different ones for a second
    Accelerator; a notebook or test that trains twice (say fp32, then bf16) needs it cleared.
    Only in a single process: under torchrun the state holds the process group."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def prepare_run(cfg: RunConfig, accelerator, pipe, family, out: Path, report) -> Run:
    set_seed(cfg.train.seed)
    if cfg.train.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = HALF_DTYPES.get(cfg.train.mixed_precision, torch.float32)
    pipe.to(accelerator.device)
    if dtype != torch.float32:  # frozen base in half precision; the LoRA weights stay fp32
        pipe.to(dtype=dtype)
        if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
            pipe.vae.to(torch.float32)  # SDXL's VAE overflows to NaN in fp16
            logger.info("VAE kept in float32: its config says it overflows in float16")
    class_samples = None  # drawn by the base model, before any adapter exists
    if cfg.data.class_dir:
        made = ensure_class_images(pipe, cfg, accelerator.is_main_process)
        accelerator.wait_for_everyone()  # the other processes read what the main one drew
        class_samples = scan_class_images(cfg)
        logger.info("prior preservation: %d class images (%d drawn now)", len(class_samples), made)
    set_attention(pipe, cfg.train.attention)
    param_groups = add_lora_adapters(pipe, cfg, family)
    trained_text = tuple(part.part for part in text_encoder_loras(cfg, family))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, list(trained_text))
    parts = Components.of(pipe, family)
    samples, held_out = split_validation(report.samples, cfg.data.validation_split, cfg.train.seed)
    loader, sampler = build_dataloader(
        samples,
        cfg,
        parts.tokenizer_map,
        accelerator.process_index,
        accelerator.num_processes,
        class_samples,
    )
    optimizer = build_optimizer(cfg.train.optimizer, param_groups, cfg.train.weight_decay)
    lr_scheduler = _build_lr_scheduler(cfg, optimizer, accelerator.num_processes)
    # Compiled after the LoRA layers exist; pipe.unet (samples, saving) stays the plain module.
    unet = torch.compile(pipe.unet) if cfg.train.compile else pipe.unet
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    text_encoders = {}
    for name, encoder in zip(family.text_encoders, parts.text_encoders, strict=True):
        # A frozen module must not be wrapped for data parallelism.
        text_encoders[name] = accelerator.prepare(encoder) if name in trained_text else encoder
    trainable = [p for group in param_groups for p in group["params"]]
    ema = AdapterEMA(trainable, cfg.train.ema_decay) if cfg.train.ema_decay else None
    run = Run(
        cfg,
        accelerator,
        pipe,
        family,
        out,
        unet,
        text_encoders,
        optimizer,
        lr_scheduler,
        loader,
        sampler,
        trainable,
        build_objective(cfg, pipe.scheduler),
        dtype,
        ema,
        trained_text_encoders=trained_text,
    )
    open_caches(run)
    if held_out:
        run.validation = build_validation_loader(held_out, cfg, parts.tokenizer_map)
        logger.info("validation: %d held-out images", len(held_out))
    if accelerator.is_main_process:
        accelerator.init_trackers("sdtune")
        _log_summary(run, len(loader.dataset))
    prebuild_caches(run)
    return run


def _build_lr_scheduler(cfg: RunConfig, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process, so the step counts scale with it.
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps * num_processes,
        num_training_steps=cfg.train.max_steps * num_processes,
        num_cycles=cfg.train.lr_cycles,
        power=cfg.train.lr_power,
    )


def _log_summary(run: Run, items: int) -> None:
    t, acc = run.cfg.train, run.accelerator
    buckets = getattr(run.loader.dataset, "buckets", None)
    if buckets:
        counts = Counter(buckets)
        logger.info(
            "buckets: %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
        )
    effective = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    logger.info(
        "family %s (%s) | %d items per epoch | %s trainable LoRA parameters | batch %d x %d "
        "accumulation x %d processes = %d | %d steps (~%.1f epochs) | optimizer %s",
        run.family.name,
        run.objective.prediction_type,
        items,
        f"{sum(p.numel() for p in run.trainable):,}",
        t.batch_size,
        t.gradient_accumulation_steps,
        acc.num_processes,
        effective,
        t.max_steps,
        t.max_steps * effective / max(items, 1),
        t.optimizer,
    )


def run_steps(run: Run) -> float:
    """Train until max_steps; returns the last logged loss."""
    cfg, acc, progress = run.cfg, run.accelerator, run.progress
    last_loss, started, images = float("nan"), time.perf_counter(), 0
    step_loss = StepLoss()  # the micro-batches of the optimizer step under way
    first_step = progress.step
    run.unet.train()
    for name, encoder in run.text_encoders.items():
        encoder.train(name in run.trained_text_encoders)
    run.sampler.set_epoch(progress.epoch)
    run.sampler.skip_next(progress.batch_in_epoch * cfg.train.batch_size)
    bar = progress_bar(run)
    run.events.sinks.append(progress_bar_sink(bar))
    while progress.step < cfg.train.max_steps and run.stopped is None:
        for batch in run.loader:
            progress.batch_in_epoch += 1
            try:
                loss, grad_norm = _micro_step(run, batch)
            except _SkipStep:
                step_loss = StepLoss()
                continue
            images += len(batch["draws"])
            step_loss.add(loss, len(batch["draws"]))
            if not acc.sync_gradients:
                continue
            loss, step_loss = step_loss.mean(), StepLoss()
            progress.step += 1
            if run.ema is not None:
                run.ema.update()
            elapsed = time.perf_counter() - started
            left_s = (cfg.train.max_steps - progress.step) * elapsed / (progress.step - first_step)
            if progress.step - first_step == ETA_AFTER_STEPS and acc.is_main_process:
                logger.info(
                    "time: %.2f s/step over the first %d steps, about %s for the %d left",
                    elapsed / ETA_AFTER_STEPS,
                    ETA_AFTER_STEPS,
                    format_duration(left_s),
                    cfg.train.max_steps - progress.step,
                )
            if (
                progress.step % cfg.train.log_every_n_steps == 0
                or progress.step == cfg.train.max_steps
            ):
                last_loss = log_step(run, loss, grad_norm, images / elapsed, left_s)
            _maybe_checkpoint_and_sample(run)
            run.stopped = run.stop.agreed_reason(acc) if run.stop is not None else None
            if progress.step >= cfg.train.max_steps or run.stopped is not None:
                break
        else:  # the pass ended: the next one is a new epoch
            progress.epoch += 1
            progress.batch_in_epoch = 0
    run.events.sinks.remove(run.events.sinks[-1])
    bar.close()
    return last_loss


def _micro_step(run: Run, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss, backward and (on the last micro-batch of an accumulation) the optimizer step."""
    acc, cfg = run.accelerator, run.cfg
    grad_norm = None
    with acc.accumulate(run.unet, *run.text_encoders.values()):
        loss = training_step(batch, run)
        _guard_finite(run, loss, "loss")
        acc.backward(loss)
        if acc.sync_gradients and cfg.train.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.trainable, cfg.train.max_grad_norm)
            _guard_finite(run, grad_norm, "gradient norm")
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:  # a finite loss and gradient can still make an infinite update
            check_weights_finite(run, run.progress.step + 1)
    return loss, grad_norm


def _guard_finite(run: Run, value: torch.Tensor, what: str) -> None:
    """Stop (or skip, by option) at the step where a loss or gradient stops being finite."""
    if torch.isfinite(value).all():
        return
    step = run.progress.step + 1
    if run.cfg.train.on_nonfinite == "skip":
        logger.warning("step %d: non-finite %s, step skipped", step, what)
        run.optimizer.zero_grad(set_to_none=True)
        raise _SkipStep
    saved = ckpt.list_checkpoints(run.out)
    raise SdtuneError(
        f"non-finite {what} at step {step}; the run stopped and nothing from this step was saved "
        f"(last checkpoint: {saved[-1] if saved else 'none'}); lower train.learning_rate, use "
        "train.mixed_precision=bf16, or set train.on_nonfinite=skip"
    )


class _SkipStep(Exception):
    pass


def _maybe_checkpoint_and_sample(run: Run) -> None:
    cfg, step = run.cfg, run.progress.step
    every = cfg.train.checkpoint_every_n_steps
    if every and step % every == 0 and step < cfg.train.max_steps:
        _checkpoint(run)
    every = cfg.output.validation_every_n_steps
    if every and run.validation is not None and step % every == 0 and step < cfg.train.max_steps:
        validate(run)
    every = cfg.output.sample_every_n_steps
    if every and step % every == 0 and cfg.output.sample_prompts and step < cfg.train.max_steps:
        _samples(run, f"step{step:06d}")


def _checkpoint(run: Run) -> Path | None:
    path = save_checkpoint(run)
    if path is not None:  # written by the main process
        run.events.emit(CheckpointWritten(run.progress.step, str(path)))
    return path


def _samples(run: Run, stem: str) -> Path:
    grid = save_samples(run, stem)
    run.events.emit(SamplesWritten(run.progress.step, str(grid)))
    return grid


def validate(run: Run) -> float:
    """Log the held-out loss at this step (every process computes it; the main one logs)."""
    value = compute_validation_loss(run, run.validation, training_step)
    run.events.emit(Validated(run.progress.step, value))
    return value


def save_final(run: Run) -> Path:
    """The adapter (and its EMA), a sample image, the model card and the config."""
    if run.validation is not None:
        validate(run)
    log_cache_totals(run)
    pipe = run.pipe
    # Training is over: the returned pipeline gets its models' own forward back (without
    # accelerate's autocast wrapper, whose fp32 outputs a half-precision VAE cannot take).
    unwrap = run.accelerator.unwrap_model
    pipe.unet = unwrap(run.unet, keep_fp32_wrapper=False, keep_torch_compile=False).eval()
    for name, encoder in run.text_encoders.items():
        encoder = unwrap(encoder, keep_fp32_wrapper=False).eval()
        # accelerate puts back the bound forward it saved; transformers 5 models called through
        # it return no hidden_states (SDXL's prompts need them), so the class's own is used.
        encoder.__dict__.pop("forward", None)
        setattr(pipe, name, encoder)
    return save_final_files(run, lambda: _samples(run, "final"))
