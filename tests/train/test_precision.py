import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdtune.config import load_config
from sdtune.train.loop import train


def test_bf16_keeps_the_base_in_bf16_and_the_adapter_in_fp32(tiny_sd1_dir, star_images, tmp_path):
    result = train(
        load_config(
            None,
            {
                "model.path": str(tiny_sd1_dir),
                "data.dir": str(star_images),
                "data.resolution": 64,
                "train.max_steps": 2,
                "train.batch_size": 2,
                "train.mixed_precision": "bf16",
                "lora.train_text_encoder": True,
                "train.gradient_checkpointing": True,
                "output.dir": str(tmp_path / "run"),
            },
        )
    )
    for model in (result.pipeline.unet, result.pipeline.text_encoder):
        lora = {p.dtype for n, p in model.named_parameters() if "lora" in n}
        base = {p.dtype for n, p in model.named_parameters() if "lora" not in n}
        assert lora == {torch.float32} and base == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(result.last_loss))
    # The returned pipeline generates in bf16 (its U-Net no longer hands fp32 to the VAE).
    from sdtune.generate.run import GenerationRequest, generate

    request = GenerationRequest(prompt="a sks star", steps=2, width=32, height=32, output_type="np")
    image = generate(result.pipeline, request).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.slow  # inductor compiles the U-Net first: ~30 s on 2 cores
def test_compiled_training_matches_eager_and_saves_plain_keys(tiny_sd1_dir, star_images, tmp_path):
    runs = {}
    for compiled in (False, True):
        cfg = load_config(
            None,
            {
                "model.path": str(tiny_sd1_dir),
                "data.dir": str(star_images),
                "data.resolution": 32,
                "lora.rank": 2,
                "train.max_steps": 3,
                "train.batch_size": 2,
                "train.compile": compiled,
                "output.dir": str(tmp_path / str(compiled)),
                "output.log_with": "none",
            },
        )
        runs[compiled] = load_file(str(train(cfg).adapter_path))
    assert runs[True].keys() == runs[False].keys()  # no `_orig_mod` in the saved names
    for key, eager in runs[False].items():
        torch.testing.assert_close(runs[True][key], eager, atol=1e-5, rtol=1e-4)
