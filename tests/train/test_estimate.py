"""The memory estimate against what a real step allocates.

The estimate runs the step on the meta device; the measurement runs a plain training step on
real CPU tensors and reads the allocator's own events from torch's profiler (every allocation
and free, in order), so the two share no counting code.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.utils.checkpoint
from torch.profiler import ProfilerActivity, profile, record_function

from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.build import build_pipeline
from sdtune.models.families import get_family
from sdtune.models.tiny import tiny_family_configs
from sdtune.train.estimate import compute_optimizer_bytes, estimate_memory, resolve_family_name
from sdtune.train.optim import build_optimizer
from sdtune.train.setup import add_lora_adapters

SD1 = get_family("sd1")


def tiny_config(**overrides):
    items = {"model.path": "x", "data.dir": "x", "data.resolution": "64", "train.batch_size": "2"}
    return load_config(None, {**items, **overrides})


def allocated_bytes(events, until_ns: int) -> tuple[int, int]:
    """(bytes held at `until_ns`, peak bytes held), from the profiler's allocation (+) and
    free (-) events in time order."""
    live = peak = at_mark = 0
    for start, size in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if start < until_ns:
            at_mark = live + size
        live += size
        peak = max(peak, live)
    return at_mark, peak


def measure_cpu_step(cfg) -> tuple[int, int, int, int]:
    """A textbook step on the real tiny model: (base bytes, LoRA bytes, bytes alive after the
    forward, peak bytes of forward + backward), the last two from the profiler. A bf16 run
    has a bf16 base and fp32 adapters under CPU autocast."""
    half = cfg.train.mixed_precision == "bf16"
    pipe = build_pipeline(SD1, tiny_family_configs(SD1)).to(dtype=torch.bfloat16 if half else None)
    base = sum(
        p.numel() * p.element_size()
        for m in (pipe.unet, pipe.vae, pipe.text_encoder)
        for p in m.parameters()
    )
    trainable = [p for g in add_lora_adapters(pipe, cfg) for p in g["params"]]
    if cfg.train.gradient_checkpointing:
        # Each checkpointed block keeps a copy of the CPU RNG state; on a GPU run that copy is
        # host memory, so it is left out here to compare only what would sit on the device.
        checkpoint = functools.partial(
            torch.utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False
        )
        pipe.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    pipe.unet.train()
    side, batch = cfg.data.resolution, cfg.train.batch_size
    pixels = torch.randn(batch, 3, side, side, dtype=torch.bfloat16 if half else None)
    ids = torch.randint(0, 1000, (batch, 77))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            with torch.no_grad():
                latents = pipe.vae.encode(pixels).latent_dist.sample()
            noise = torch.randn_like(latents)
            text = pipe.text_encoder(ids)[0]
            timesteps = torch.zeros(batch, dtype=torch.long)
            prediction = pipe.unet(latents + noise, timesteps, text).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        del latents, text, prediction
        with record_function("backward"):
            loss.backward()
    events = list(prof.profiler.kineto_results.events())
    mark = min(e.start_ns() for e in events if e.name() == "backward")
    after_forward, peak = allocated_bytes(events, mark)
    return base, sum(4 * p.numel() for p in trainable), after_forward, peak


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"train.gradient_checkpointing": "true"},
        {"train.mixed_precision": "bf16", "data.resolution": "128"},
    ],
    ids=["fp32", "checkpointing", "bf16-autocast"],
)
def test_estimate_matches_what_a_real_cpu_step_allocates(overrides):
    cfg = tiny_config(**overrides)
    meta = build_pipeline(SD1, tiny_family_configs(SD1), empty=True)
    # CPU autocast keeps norms in bf16 where CUDA's runs them in fp32; compare like with like.
    estimate = estimate_memory(cfg, meta, fp32_norms=False)
    base, lora, kept, peak = measure_cpu_step(cfg)

    assert estimate.weights == base
    assert estimate.lora == lora
    assert estimate.activations == pytest.approx(kept, rel=0.1)
    step_peak = estimate.activations + estimate.backward
    if (
        cfg.train.mixed_precision == "bf16"
        and "AVX512" not in torch.backends.cpu.get_cpu_capability()
    ):
        # Without AVX-512 the CPU has no bf16 kernels: each bf16 op converts its inputs to fp32
        # copies first, temporaries a GPU never allocates. The estimate is for the GPU's step.
        assert estimate.activations < step_peak <= peak
    else:
        assert step_peak == pytest.approx(peak, rel=0.1)


def test_an_inpainting_estimate_feeds_the_mask_and_masked_image_channels():
    # The 9-channel U-Net refuses 4-channel input, so the step must add the family's 5 extra
    # channels; they are alive after the forward on top of what the plain step keeps.
    cfg = tiny_config()
    inpaint = get_family("sd1-inpaint")
    plain = estimate_memory(cfg, build_pipeline(SD1, tiny_family_configs(SD1), empty=True))
    meta = build_pipeline(inpaint, tiny_family_configs(inpaint), empty=True)
    estimate = estimate_memory(cfg, meta)
    assert meta.unet.config.in_channels == 9
    assert estimate.activations > plain.activations


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "sgd", "adafactor"])
def test_optimizer_bytes_equal_the_state_the_optimizer_allocates(name):
    # One tensor big enough for 8-bit state (>= 4096 elements), one small that stays fp32.
    params = [torch.nn.Parameter(torch.randn(16, 320)), torch.nn.Parameter(torch.randn(16, 8))]
    opt = build_optimizer(name, [{"params": params, "lr": 1e-3}], 0.0)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    tensors = {  # by address: bitsandbytes shares one code map between tensors
        v.data_ptr(): v.numel() * v.element_size()
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v) and v.numel() > 1  # step counters and RMS are scalars
    }
    held = sum(tensors.values())
    assert compute_optimizer_bytes(name, params) == held


def test_a_hub_id_needs_model_family():
    cfg = load_config(None, {"model.path": "someone/some-model", "data.dir": "x"})
    with pytest.raises(SdtuneError, match="set model.family"):
        resolve_family_name(cfg)


@pytest.mark.parametrize(
    "items, expected",
    [
        (["model.path=someone/some-model"], "set model.family"),
        (["model.family=sd2-depth"], "'sd2-depth' family is not supported yet"),
    ],
)
def test_cli_reports_what_it_cannot_estimate_in_one_line(capsys, items, expected):
    from sdtune.cli.main import main

    assert main(["estimate", *items]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_estimate_is_within_15_percent_of_the_cuda_peak():
    """The step's share of the peak (activations, gradients, temporaries) on a real GPU, bf16
    base under autocast with fp32 adapters, as the loop runs it."""
    cfg = tiny_config(
        **{"data.resolution": "256", "train.batch_size": "4", "train.mixed_precision": "bf16"}
    )
    estimate = estimate_memory(cfg, build_pipeline(SD1, tiny_family_configs(SD1), empty=True))
    pipe = build_pipeline(SD1, tiny_family_configs(SD1)).to("cuda", torch.bfloat16)
    trainable = [p for g in add_lora_adapters(pipe, cfg) for p in g["params"]]
    pipe.unet.train()
    pixels = torch.randn(4, 3, 256, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (4, 77), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                latents = pipe.vae.encode(pixels).latent_dist.sample()
            noise = torch.randn_like(latents)
            text = pipe.text_encoder(ids)[0]
            timesteps = torch.zeros(4, dtype=torch.long, device="cuda")
            prediction = pipe.unet(latents + noise, timesteps, text).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        del latents, text, prediction
        loss.backward()

    step()  # warm-up: cuBLAS workspace and kernels are allocated once, before the measurement
    for p in trainable:
        p.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    assert estimate.activations + estimate.backward == pytest.approx(measured, rel=0.15)


def test_the_readme_estimate_line_prints_what_the_readme_says(capsys):
    """The README quotes one `sdtune estimate` command and its total: they must agree."""
    import re
    import shlex
    from pathlib import Path

    from sdtune.cli.main import main

    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    command, total = re.search(
        r"`(sdtune estimate [^`]+)` prints a total of ([0-9.]+) GiB", readme
    ).groups()
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    assert out.startswith("assuming a CUDA GPU with bf16") or torch.cuda.is_available()
    assert "model.path" not in command and "not needed" not in out  # the family is enough
    assert re.search(rf"^total\s+{re.escape(total)}\s", out, re.M), out


def test_the_target_device_decides_what_auto_means_and_what_it_is_compared_with(capsys):
    from sdtune.cli.main import main
    from sdtune.train.estimate import (
        MemoryEstimate,
        device_memory_line,
        parse_memory_size,
        precision_on,
        resolve_target,
    )

    assert precision_on("auto", resolve_target("cpu")) == "no"
    assert precision_on("auto", resolve_target("cuda", "24GB")) == "bf16"
    assert precision_on("fp16", resolve_target("cuda", "24GB")) == "fp16"  # explicit stays
    if not torch.cuda.is_available():
        assert precision_on("auto", resolve_target()) == "bf16"  # an estimate is for a GPU
    assert [parse_memory_size(s) for s in ("24GB", "24 GiB", "80", "512MB")] == [
        24 * 2**30,
        24 * 2**30,
        80 * 2**30,
        512 * 2**20,
    ]
    three = MemoryEstimate(2**30, 2**30, 0, 2**30, 0)
    line, too_big = device_memory_line(three, resolve_target("cuda", "2GB"))
    assert too_big and line.startswith("warning: predicted peak 3.00 GiB exceeds")
    line, too_big = device_memory_line(three, resolve_target("cuda", "24GB"))
    assert not too_big and line.startswith("fits a CUDA GPU with 24.0 GiB")
    assert main(["estimate", "--gpu", "lots", "model.family=sd1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu takes a memory size" in err
