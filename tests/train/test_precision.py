import torch

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
