"""Several adapters at inference: weights switched live, fused, unloaded back to the base."""

from __future__ import annotations

import numpy as np
import pytest

from sdtune.errors import SdtuneError
from sdtune.generate.adapters import (
    adapter_names,
    fuse_adapters,
    is_fused,
    set_adapter_weights,
    unfuse_adapters,
    unload_adapters,
)
from sdtune.generate.run import GenerationRequest, generate
from sdtune.generate.txt2img import load_adapters
from tests.generate.conftest import make_adapter, tiny

REQ = GenerationRequest(prompt="a star", steps=2, seeds=[1], output_type="np")


def _draw(pipe):
    return generate(pipe, REQ).images[0]


def test_two_adapters_switch_live_fuse_and_unload(tmp_path):
    pipe = tiny("sd1")
    base = _draw(pipe)
    a = make_adapter("sd1", tmp_path / "a", seed=1)
    b = make_adapter("sd1", tmp_path / "b", seed=2)

    load_adapters(pipe, [(a, 1.0)])
    only_a = _draw(pipe)
    unload_adapters(pipe)
    np.testing.assert_array_equal(_draw(pipe), base)  # live unload is bit-exact

    load_adapters(pipe, [(a, 1.0), (b, 0.5)])
    assert adapter_names(pipe) == ["adapter_0", "adapter_1"]
    both = _draw(pipe)
    assert np.abs(both - only_a).max() > 1e-3
    set_adapter_weights(pipe, [1.0, 0.0])  # switched without reloading the base
    np.testing.assert_allclose(_draw(pipe), only_a, atol=1e-5)
    set_adapter_weights(pipe, {"adapter_1": 0.5, "adapter_0": 1.0})
    np.testing.assert_allclose(_draw(pipe), both, atol=1e-5)

    fuse_adapters(pipe)
    assert is_fused(pipe)
    np.testing.assert_allclose(_draw(pipe), both, atol=1e-4)
    with pytest.raises(SdtuneError, match="unfuse them before reweighting"):
        set_adapter_weights(pipe, [1.0, 1.0])
    unfuse_adapters(pipe)
    np.testing.assert_allclose(_draw(pipe), both, atol=1e-4)  # live again
    unload_adapters(pipe)
    np.testing.assert_allclose(_draw(pipe), base, atol=1e-5)
    with pytest.raises(SdtuneError, match="2 weights given for 0 loaded adapters"):
        set_adapter_weights(pipe, [1.0, 1.0])


def test_adapter_made_on_plain_sd1_runs_in_img2img_and_fallback_inpaint(tmp_path, rgb64, mask64):
    """Adapters load on the base and apply in every mode reached through `from_pipe`."""
    pipe = tiny("sd1")
    for mode in ("img2img", "inpaint"):
        req = GenerationRequest(
            prompt="x", mode=mode, image=rgb64, mask=mask64, steps=2, output_type="np"
        )
        base = generate(pipe, req).images[0]
        load_adapters(pipe, [(make_adapter("sd1", tmp_path / mode), 1.0)], fuse=True)
        assert np.abs(generate(pipe, req).images[0] - base).max() > 1e-3
        unload_adapters(pipe)
        np.testing.assert_allclose(generate(pipe, req).images[0], base, atol=1e-4)
