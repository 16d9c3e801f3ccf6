"""The CUDA path: half precision with an fp32 VAE, SDPA, channels-last, offload, compile.
Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.generate.run import GenerationRequest, generate
from tests.generate.conftest import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_is_deterministic(dtype, rgb64):
    from sdtune.generate.device import place_pipeline

    pipe = place_pipeline(tiny("sd1"), torch.device("cuda"), dtype, channels_last=True)
    assert pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    for mode in ("txt2img", "img2img"):
        req = GenerationRequest(prompt="x", mode=mode, image=rgb64, steps=2, output_type="np")
        first = generate(pipe, req).images[0]
        assert np.isfinite(first).all()
        np.testing.assert_array_equal(generate(pipe, req).images[0], first)


def test_cpu_offload_and_compile(sd1_adapter):
    from sdtune.generate.device import compile_unet, place_pipeline
    from sdtune.generate.txt2img import load_adapters

    pipe = tiny("sd1")
    load_adapters(pipe, [(sd1_adapter, 1.0)], fuse=True)
    place_pipeline(pipe, torch.device("cuda"), torch.float16, cpu_offload=True)
    req = GenerationRequest(prompt="x", steps=2, output_type="np")
    offloaded = generate(pipe, req).images[0]
    compile_unet(pipe)
    np.testing.assert_allclose(generate(pipe, req).images[0], offloaded, atol=2e-2)
