"""An adapter trained with zero terminal SNR is sampled as Lin et al. 2023 sample: the rescaled
schedule from its last step (trailing spacing) and rescaled guidance; read from its header,
overridable, and said in the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.adapters.io import save_adapter
from sdtune.adapters.lora import build_lora_config
from sdtune.errors import SdtuneError
from sdtune.generate.run import (
    GenerationRequest,
    build_generation_job,
    generate,
    generate_to_folder,
)
from tests.generate.a1111_infotext import parse_infotext
from tests.generate.conftest import ATTENTION, tiny

ZTSNR_FIELDS = {"Noise Schedule": "Zero Terminal SNR", "Timestep spacing": "trailing"}


@pytest.fixture(scope="module")
def ztsnr_adapter(tmp_path_factory):
    """A tiny SD 2 768-v base on disk and an adapter whose header says zero terminal SNR."""
    root = tmp_path_factory.mktemp("ztsnr")
    pipe = tiny("sd2-v")
    pipe.save_pretrained(root / "base")
    pipe.unet.add_adapter(build_lora_config(4, 4, 0.0, ATTENTION))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    info = {"family": "sd2-v", "base_model": str(root / "base"), "zero_terminal_snr": True}
    return root / "base", save_adapter(root / "lora", pipe.unet, info=info)


def _draw(ztsnr_adapter, out, **fields):
    _, adapter = ztsnr_adapter
    values = dict(prompt="a star", out=str(out), lora=[(str(adapter), 1.0)], steps=3, seed=1)
    paths = generate_to_folder(
        build_generation_job({**values, "width": 32, "height": 32, **fields})
    )
    return np.asarray(Image.open(paths[0])), parse_infotext(Image.open(paths[0]).text["parameters"])


def test_the_header_turns_it_on_and_the_flag_overrides(ztsnr_adapter, tmp_path):
    default, fields = _draw(ztsnr_adapter, tmp_path / "a")
    assert {k: fields[k] for k in ZTSNR_FIELDS} == ZTSNR_FIELDS
    assert fields["CFG Rescale"] == "0.7" and fields["Sampler"] == "DDIM"
    forced, _ = _draw(ztsnr_adapter, tmp_path / "b", zero_terminal_snr=True)
    np.testing.assert_array_equal(forced, default)
    plain, plain_fields = _draw(ztsnr_adapter, tmp_path / "c", zero_terminal_snr=False)
    assert not set(ZTSNR_FIELDS) & set(plain_fields) and "CFG Rescale" not in plain_fields
    assert np.abs(plain.astype(int) - default).max() > 0
    other, other_fields = _draw(ztsnr_adapter, tmp_path / "d", guidance_rescale=0.0)
    assert "CFG Rescale" not in other_fields and np.abs(other.astype(int) - default).max() > 0


def test_the_schedule_is_rescaled_and_starts_at_the_last_step(ztsnr_adapter):
    pipe = tiny("sd2-v")
    req = GenerationRequest(prompt="x", steps=4, width=32, height=32, zero_terminal_snr=True)
    result = generate(pipe, req)
    scheduler = result.scheduler
    assert (
        scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    )
    assert int(scheduler.timesteps[0]) == scheduler.config.num_train_timesteps - 1
    assert float(scheduler.alphas_cumprod[-1]) == 0.0  # SNR 0 at the last step
    assert result.guidance_rescale == 0.7 and np.isfinite(np.asarray(result.images[0])).all()
    assert pipe.scheduler.config.timestep_spacing != "trailing"  # the caller's pipe is untouched


def test_schedulers_and_models_that_cannot_are_refused():
    req = GenerationRequest(prompt="x", steps=2, width=32, height=32, zero_terminal_snr=True)
    with pytest.raises(SdtuneError, match="cannot sample with zero terminal SNR; use one of"):
        generate(tiny("sd2-v"), GenerationRequest(**{**vars(req), "scheduler": "pndm"}))
    with pytest.raises(SdtuneError, match="needs a v-prediction model"):
        generate(tiny("sd1"), req)  # epsilon: nothing to sample from SNR 0
