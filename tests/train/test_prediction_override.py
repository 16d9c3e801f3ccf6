"""An adapter trained to predict something other than its base does (SD 1.5 turned to
v-prediction with zero terminal SNR, Lin et al. 2023) samples with what it learned: in the
run's own samples, in `sdtune generate` by default, and in the kohya file's metadata."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from sdtune.config import load_config
from sdtune.generate.run import (
    GenerationRequest,
    build_generation_job,
    generate,
    generate_to_folder,
)

PROMPT = "a red sks star"


@pytest.fixture(scope="module")
def v_run(tiny_sd1_dir, star_images, tmp_path_factory):
    from sdtune.train.loop import train

    out = tmp_path_factory.mktemp("v") / "run"
    values = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(star_images),
        "data.resolution": 32,
        "lora.rank": 4,
        "train.max_steps": 2,
        "train.learning_rate": 1e-2,
        "train.prediction_type": "v_prediction",
        "train.zero_terminal_snr": True,
        "output.dir": str(out),
        "output.log_with": "none",
        "output.sample_prompts": PROMPT,
        "output.sample_steps": 2,
    }
    return train(load_config(None, {k: str(v) for k, v in values.items()}))


def _generate(model, run, out, **fields) -> np.ndarray:
    values = dict(
        prompt=PROMPT, out=str(out), model=str(model), lora=[(str(run), 1.0)], steps=2, seed=0,
        width=32, height=32, **fields,
    )  # fmt: skip
    return np.asarray(Image.open(generate_to_folder(build_generation_job(values))[0]))


def test_generate_samples_as_the_adapter_was_trained(v_run, tiny_sd1_dir, tmp_path):
    run = v_run.adapter_path.parent
    sample = np.asarray(Image.open(run / "samples" / "final-prompt0.png"))
    np.testing.assert_array_equal(_generate(tiny_sd1_dir, run, tmp_path / "a"), sample)
    # Told to predict epsilon (and so to sample without zero terminal SNR), it draws another image
    epsilon = _generate(
        tiny_sd1_dir, run, tmp_path / "b", prediction_type="epsilon", zero_terminal_snr=False
    )
    assert np.abs(epsilon.astype(int) - sample).max() > 0


def test_the_sampler_predicts_v_and_the_base_is_left_as_it_was(v_run):
    pipe = v_run.pipeline
    assert pipe.scheduler.config.prediction_type == "epsilon"
    request = GenerationRequest(
        prompt=PROMPT, steps=2, seeds=[0], width=32, height=32, output_type="np",
        prediction_type="v_prediction",
    )  # fmt: skip
    result = generate(pipe, request)
    assert result.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_the_kohya_file_says_v_prediction(v_run):
    run = v_run.adapter_path.parent
    with safe_open(str(run / f"{run.name}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["ss_v_parameterization"] == "True"
    assert meta["ss_base_model_version"] == "sd_v1"
