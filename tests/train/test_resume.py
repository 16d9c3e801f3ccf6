"""Exact resume, checkpoint rotation, the NaN guard and gradient accumulation, on a tiny SD 1."""

import pytest
import torch
from safetensors.torch import load_file

import sdtune.train.loop as loop
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.train.checkpoint import list_checkpoints, resolve_resume
from sdtune.train.loop import train
from sdtune.train.saving import EMA_FILE_NAME


def _config(tiny_sd1_dir, star_images, out, **overrides):
    values = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 64,
        "data.center_crop": False,
        "data.random_flip": True,
        "data.shuffle_tags": True,
        "data.tag_dropout": 0.2,
        "lora.rank": 4,
        "lora.train_text_encoder": True,
        "train.batch_size": 2,
        "train.max_steps": 6,
        "train.learning_rate": 1e-3,
        "train.lr_scheduler": "cosine",
        "train.warmup_steps": 2,
        "train.noise_offset": 0.05,
        "train.min_snr_gamma": 5.0,
        "train.ema_decay": 0.9,
        "train.log_every_n_steps": 1,
        "output.dir": str(out),
    }
    values.update(overrides)
    return load_config(None, values)


def _crash_on_call(monkeypatch, n: int):
    real, calls = loop.training_step, {"n": 0}

    def crashing(batch, run):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(batch, run)

    monkeypatch.setattr(loop, "training_step", crashing)


def _assert_same_tensors(a, b):
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch
):
    common = {"train.gradient_accumulation_steps": 2, "train.checkpoint_every_n_steps": 3}
    whole = train(_config(tiny_sd1_dir, star_images, tmp_path / "whole", **common))
    # 8 images, batch 2: 4 micro-batches per epoch, 2 per step. The crash comes in step 5, after
    # the checkpoint of step 3, which sits in the middle of the second epoch.
    _crash_on_call(monkeypatch, 9)
    broken = _config(tiny_sd1_dir, star_images, tmp_path / "broken", **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(broken)
    assert not (tmp_path / "broken" / "pytorch_lora_weights.safetensors").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "broken")] == ["step-000003"]
    monkeypatch.undo()
    resumed = train(
        _config(
            tiny_sd1_dir, star_images, tmp_path / "broken", **common, **{"train.resume": "latest"}
        )
    )
    assert resumed.steps == whole.steps == 6
    _assert_same_tensors(resumed.adapter_path, whole.adapter_path)
    _assert_same_tensors(resumed.output_dir / EMA_FILE_NAME, whole.output_dir / EMA_FILE_NAME)
    ema, live = load_file(str(whole.output_dir / EMA_FILE_NAME)), load_file(str(whole.adapter_path))
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # the EMA is an average, not a copy


def test_rotation_keeps_the_newest_and_latest_ignores_torn_ones(
    tiny_sd1_dir, star_images, tmp_path
):
    cfg = _config(
        tiny_sd1_dir,
        star_images,
        tmp_path / "run",
        **{
            "train.max_steps": 5,
            "train.checkpoint_every_n_steps": 1,
            "train.keep_checkpoints": 2,
            "lora.train_text_encoder": False,
            "train.ema_decay": 0.0,
        },
    )
    train(cfg)
    root = tmp_path / "run"
    assert [p.name for p in list_checkpoints(root)] == ["step-000003", "step-000004"]
    (root / "checkpoints" / ".tmp-step-000007").mkdir()  # killed while writing
    (root / "checkpoints" / "step-000009").mkdir()  # no COMPLETE marker
    assert resolve_resume(root, "latest").name == "step-000004"
    adapter = load_file(
        str(root / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    )
    assert adapter and all(k.startswith("unet.") for k in adapter)


def test_nan_loss_stops_at_its_step_and_keeps_the_checkpoint(
    tiny_sd1_dir, star_images, tmp_path, monkeypatch
):
    real, calls = loop.compute_loss, {"n": 0}

    def nan_at_five(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value

    monkeypatch.setattr(loop, "compute_loss", nan_at_five)
    cfg = _config(
        tiny_sd1_dir,
        star_images,
        tmp_path / "run",
        **{"train.checkpoint_every_n_steps": 2, "train.ema_decay": 0.0},
    )
    with pytest.raises(SdtuneError, match="non-finite loss at step 5.*step-000004"):
        train(cfg)
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
    state = load_file(
        str(tmp_path / "run/checkpoints/step-000004/pytorch_lora_weights.safetensors")
    )
    assert all(torch.isfinite(t).all() for t in state.values())
    calls["n"] = 0
    skipped = train(
        _config(
            tiny_sd1_dir,
            star_images,
            tmp_path / "skip",
            **{"train.on_nonfinite": "skip", "train.ema_decay": 0.0},
        )
    )
    final = load_file(str(skipped.adapter_path))
    assert skipped.steps == 6 and all(torch.isfinite(t).all() for t in final.values())


def test_two_accumulated_batches_of_two_equal_one_batch_of_four(
    tiny_sd1_dir, star_images, tmp_path
):
    plain = {
        "data.shuffle_tags": False,
        "data.tag_dropout": 0.0,
        "train.max_steps": 3,
        "train.ema_decay": 0.0,
        "train.lr_scheduler": "constant",
        "train.warmup_steps": 0,
    }
    big = train(
        _config(tiny_sd1_dir, star_images, tmp_path / "b4", **plain, **{"train.batch_size": 4})
    )
    accumulated = train(
        _config(
            tiny_sd1_dir,
            star_images,
            tmp_path / "b2x2",
            **plain,
            **{"train.batch_size": 2, "train.gradient_accumulation_steps": 2},
        )
    )
    first, second = load_file(str(big.adapter_path)), load_file(str(accumulated.adapter_path))
    # Only the rounding of batched kernels differs, but Adam's normalised step amplifies it
    # where a gradient is near zero: measured up to 3.6e-5 on one of 128 values.
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=5e-5, rtol=1e-3)
    assert any(first[k].abs().max() > 0 for k in first if "up" in k)  # B moved off zero


def test_two_processes_match_one_with_the_same_effective_batch(
    tiny_sd1_dir, star_images, tmp_path, train_in_two_processes
):
    """Real data parallelism: torchrun starts 2 CPU processes (gloo), each with half the batch."""
    plain = {
        "data.shuffle_tags": False,
        "data.tag_dropout": 0.0,
        "train.max_steps": 3,
        "train.ema_decay": 0.0,
        "lora.train_text_encoder": True,
    }
    single = train(
        _config(tiny_sd1_dir, star_images, tmp_path / "one", **plain, **{"train.batch_size": 4})
    )
    cfg = _config(tiny_sd1_dir, star_images, tmp_path / "two", **plain, **{"train.batch_size": 2})
    stdout = train_in_two_processes(cfg)
    assert "x 2 processes = 4" in stdout  # both processes joined one run
    assert stdout.count("step 3/3") == 1  # only the main process reports
    first, second = (
        load_file(str(single.adapter_path)),
        load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors")),
    )
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=2e-5, rtol=1e-3)


def test_samples_during_training_change_nothing_and_reach_tensorboard(
    tiny_sd1_dir, star_images, tmp_path
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = {"train.max_steps": 4, "train.ema_decay": 0.0, "lora.train_text_encoder": False}
    quiet = train(_config(tiny_sd1_dir, star_images, tmp_path / "quiet", **plain))
    sampled = train(
        _config(
            tiny_sd1_dir,
            star_images,
            tmp_path / "sampled",
            **plain,
            **{
                "output.sample_prompts": "a sks star|a red circle",
                "output.sample_every_n_steps": 2,
                "output.sample_steps": 2,
            },
        )
    )
    _assert_same_tensors(quiet.adapter_path, sampled.adapter_path)
    samples = tmp_path / "sampled" / "samples"
    names = sorted(p.name for p in samples.iterdir())
    assert names == [
        "final-prompt0.png",
        "final-prompt1.png",
        "final.png",
        "step000002-prompt0.png",
        "step000002-prompt1.png",
        "step000002.png",
    ]
    events = EventAccumulator(str(tmp_path / "sampled"), size_guidance={"images": 0})
    runs = [p.parent for p in (tmp_path / "sampled").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(runs[0]), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [2, 4]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert "![sample](samples/final.png)" in (tmp_path / "sampled" / "README.md").read_text()
