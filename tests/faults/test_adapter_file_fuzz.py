"""Adapter, checkpoint and base-model files that are torn, of the wrong dtype, missing keys or
made for another family: every reader answers with one SdtuneError line, never another error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdtune.adapters.inspect import inspect_adapter
from sdtune.adapters.io import read_adapter_metadata, save_adapter
from sdtune.adapters.load import attach_adapter, model_modules, read_adapter
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.loading import load_pipeline
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.checkpoint import load_training_state
from sdtune.train.setup import add_lora_adapters

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    pipe = build_tiny_pipeline("sd1")
    cfg = load_config(
        None, {"model.path": "m", "data.dir": "d", "lora.rank": 4, "lora.train_text_encoder": True}
    )
    add_lora_adapters(pipe, cfg)
    folder = tmp_path_factory.mktemp("adapter")
    return save_adapter(folder, pipe.unet, pipe.text_encoder, {"family": "sd1"})


def _readers(target):
    modules = model_modules(target)
    return {
        "metadata": read_adapter_metadata,
        "inspect": inspect_adapter,
        "read": lambda p: read_adapter(p, modules),
        "attach": lambda p: attach_adapter(target, p, "fuzz"),
    }


def _assert_clear_or_fine(target, path, must_fail=()):
    """Each reader either works or raises one SdtuneError line; any other exception escapes."""
    for name, reader in _readers(target).items():
        try:
            reader(path)
        except SdtuneError as exc:
            assert "\n" not in str(exc), (name, str(exc))
        else:
            assert name not in must_fail, f"{name} accepted {path.name}"
        finally:
            if "fuzz" in getattr(target.unet, "peft_config", {}):
                target.delete_adapters("fuzz")


@FUZZ
@given(cut=st.floats(min_value=0.0, max_value=0.999))
def test_truncated_adapter_files(good_adapter, target, tmp_path_factory, cut):
    data = good_adapter.read_bytes()
    path = tmp_path_factory.mktemp("torn") / "torn.safetensors"
    path.write_bytes(data[: int(cut * len(data))])
    _assert_clear_or_fine(target, path, must_fail=("inspect", "read", "attach"))


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 0.999), st.integers(32, 126)), min_size=1, max_size=4))
def test_adapter_headers_with_flipped_bytes(good_adapter, target, tmp_path_factory, flips):
    data = bytearray(good_adapter.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    for where, byte in flips:
        data[8 + int(where * header_len)] = byte
    path = tmp_path_factory.mktemp("flip") / "flip.safetensors"
    path.write_bytes(bytes(data))
    _assert_clear_or_fine(target, path)


def _is_up(key: str) -> bool:
    return any(part in key for part in ("lora_B", "lora.up", "lora_up"))


def _variants(good_adapter) -> dict[str, tuple[dict, dict]]:
    tensors = load_file(str(good_adapter))
    with safe_open(str(good_adapter), framework="pt") as f:
        header = dict(f.metadata())
    meta = json.loads(header["lora_adapter_metadata"])
    return {
        "int32": ({k: v.to(torch.int32) for k, v in tensors.items()}, header),
        "bool": ({k: v > 0 for k, v in tensors.items()}, header),
        "scalars": ({k: torch.tensor(1.0) for k in tensors}, header),
        "missing_up": ({k: v for k, v in tensors.items() if not _is_up(k)}, header),
        "no_lora_keys": ({"weight": torch.zeros(2, 2)}, {}),
        "empty": ({}, {}),
        "wrong_width": (
            {k: v if _is_up(k) else torch.zeros(v.shape[0], 7) for k, v in tensors.items()},
            header,
        ),
        "metadata_not_json": (tensors, {**header, "lora_adapter_metadata": "{oops"}),
        "metadata_a_list": (tensors, {**header, "lora_adapter_metadata": "[1, 2]"}),
        "alpha_a_word": (
            tensors,
            {**header, "lora_adapter_metadata": json.dumps({**meta, "unet.lora_alpha": "big"})},
        ),
        "alpha_pattern_junk": (
            tensors,
            {
                **header,
                "lora_adapter_metadata": json.dumps({**meta, "unet.alpha_pattern": {"x": [1]}}),
            },
        ),
        "other_family": (tensors, {**header, "sdtune.family": "sd2-v"}),
    }


REFUSED = {
    "int32": ("read", "attach"),
    "bool": ("read", "attach"),
    "scalars": ("inspect", "read", "attach"),
    "missing_up": ("read", "attach"),
    "no_lora_keys": ("inspect", "read", "attach"),
    "empty": ("inspect", "read", "attach"),
    "wrong_width": ("attach",),
    "metadata_not_json": ("inspect", "read", "attach"),
    "metadata_a_list": ("inspect", "read", "attach"),
    "alpha_a_word": ("inspect", "read", "attach"),
    "alpha_pattern_junk": ("read", "attach"),
    "other_family": ("attach",),
}


@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_wrong_dtype_missing_keys_bad_metadata_and_other_family(
    good_adapter, target, tmp_path, variant
):
    tensors, header = _variants(good_adapter)[variant]
    path = tmp_path / f"{variant}.safetensors"
    save_file(tensors, str(path), metadata=header)
    _assert_clear_or_fine(target, path, must_fail=REFUSED[variant])


def test_kohya_file_for_another_family_names_both(good_adapter, target, tmp_path):
    """SD 2 keys (1024-wide cross-attention) on the SD 1 tiny model."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{key}.lora_down.weight": torch.zeros(4, 1024),
        f"{key}.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(SdtuneError, match="sd2") as info:
        attach_adapter(target, tmp_path / "sd2.safetensors", "fuzz")
    assert "sd1" in str(info.value)


@FUZZ
@given(cut=st.floats(min_value=0.0, max_value=0.999))
def test_torn_training_state_is_an_sdtune_error(tmp_path_factory, cut):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.save(
        {"trainable": [torch.ones(4, 4)], "progress": {"step": 3}}, folder / "training_state.pt"
    )
    data = (folder / "training_state.pt").read_bytes()
    (folder / "training_state.pt").write_bytes(data[: int(cut * len(data))])
    with pytest.raises(SdtuneError, match="cannot read"):
        load_training_state(folder)


def test_torn_and_foreign_base_model_files(tmp_path):
    torn = tmp_path / "model.safetensors"
    torn.write_bytes(b'\x20\x00\x00\x00\x00\x00\x00\x00{"a": {"dtype": "F32"')
    junk = tmp_path / "model.ckpt"
    junk.write_bytes(b"\x80\x04not really a pickle")
    adapter_as_model = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(adapter_as_model))
    for path in (torn, junk, adapter_as_model):
        with pytest.raises(SdtuneError) as info:
            load_pipeline(path)
        assert "\n" not in str(info.value) and path.name in str(info.value)
