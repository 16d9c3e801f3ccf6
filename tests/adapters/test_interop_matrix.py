"""Every preset loads whole in code nobody here wrote: plain diffusers, and the key rules of
AUTOMATIC1111 and ComfyUI on the full-size SD 1 and SD 2 models.

Matrix: U-Net preset (attn, cross-attn, attn-ff, locon, a `re:` regex) x text encoder (off, attn,
attn-mlp) x variant (plain, DoRA, alpha = 2 x rank). The default run has every value of the
three at least once (5 adapters, `DEFAULT`); `-m slow` runs the other 40 of the 45.

Each adapter has random B weights (and DoRA magnitudes), as after training with a high lr, so
every module changes the image. It must load in plain diffusers with every trained module
wrapped and no warning, give the in-memory model's image live and fused (max abs difference
<= 1 on uint8), give the same through sdtune's loader (`sdtune generate`'s), and its kohya
export must do the same in diffusers (DoRA has no kohya form and is refused by name).
"""

import contextlib
import itertools

import numpy as np
import pytest
import torch

from sdtune.adapters.check import check_adapter, library_messages
from sdtune.adapters.export import export_kohya
from sdtune.adapters.io import save_adapter
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.generate.txt2img import load_adapters
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.setup import add_lora_adapters

UNET_PRESETS = ["attn", "cross-attn", "attn-ff", "locon", r"re:.*(attn2\.to_(k|v)|proj_out)$"]
TEXT_ENCODER = ["off", "attn", "attn-mlp"]
VARIANTS = ["plain", "dora", "alpha2x"]
# diffusers says this whenever a file has no text-encoder keys: true, and not a fault.
NO_TEXT_KEYS = "No LoRA keys associated to CLIPTextModel"


# The default run: every preset, every text-encoder target and every variant at least once,
# with LoCon (convolutions) under DoRA and an alpha != rank on attention and the text encoder.
DEFAULT = [
    ("attn", "attn-mlp", "alpha2x"),
    ("cross-attn", "off", "dora"),
    ("attn-ff", "attn", "plain"),
    ("locon", "attn-mlp", "dora"),
    (UNET_PRESETS[4], "attn", "alpha2x"),
]
FULL = [c for c in itertools.product(UNET_PRESETS, TEXT_ENCODER, VARIANTS) if c not in DEFAULT]


def _uint8(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    out = pipe("a red sks ring", num_inference_steps=2, generator=gen, output_type="np").images
    return (out * 255).round().astype(np.int16)


def _wrapped(pipe) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = set()
    for part in ("unet", "text_encoder"):
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, BaseTunerLayer):
                names.add(f"{part}.{name.removeprefix('text_model.')}")
    return names


def is_base_weights_report(message: str) -> bool:
    """transformers 5.2x logs a "LOAD REPORT" for every adapter loaded into a text encoder,
    listing the base model's own weights as MISSING (before peft's filter of adapter keys).
    Such a report that names no adapter key and no unexpected key says nothing of the file."""
    rows = [line for line in message.splitlines() if "| MISSING" in line or "| UNEXPECTED" in line]
    return (
        "LOAD REPORT" in message
        and bool(rows)
        and all("| MISSING" in r and "lora_" not in r for r in rows)
    )


def faults(said: list[str], has_text_encoder: bool) -> list[str]:
    """The messages that would mean something is wrong with the file or its loading."""
    return [
        s
        for s in said
        if not is_base_weights_report(s) and not (not has_text_encoder and NO_TEXT_KEYS in s)
    ]


@contextlib.contextmanager
def library_warnings():
    """Every warning (but FutureWarning) and diffusers/peft/transformers log record at WARNING
    or above, as text."""
    said: list[str] = []
    with library_messages() as got:
        yield said
    said += got.logs
    said += [str(w.message) for w in got.warnings if not issubclass(w.category, FutureWarning)]


def make_adapter(folder, unet: str, te: str, variant: str, keep: list | None = None):
    """A tiny SD 1 LoRA with every module's update non-zero; (file, image, wrapped modules).
    `keep`, a list, receives the trained pipeline."""
    pipe = build_tiny_pipeline("sd1")
    settings = {
        "model.path": "m",
        "data.dir": "d",
        "lora.unet_targets": unet,
        "lora.rank": "4",
        "lora.alpha": "8" if variant == "alpha2x" else "4",
        "lora.use_dora": str(variant == "dora").lower(),
        "lora.train_text_encoder": str(te != "off").lower(),
        "lora.text_encoder_targets": te if te != "off" else "attn",
    }
    add_lora_adapters(pipe, load_config(None, settings))
    gen = torch.Generator().manual_seed(len(unet) + 7 * len(te))
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.2)
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.rand(param.shape, generator=gen))
    text_encoder = pipe.text_encoder if te != "off" else None
    path = save_adapter(folder, pipe.unet, text_encoder, {"family": "sd1"})
    if keep is not None:
        keep.append(pipe)
    return path, _uint8(pipe), _wrapped(pipe)


def _plain_diffusers(file) -> tuple:
    pipe = build_tiny_pipeline("sd1")
    with library_warnings() as said:
        pipe.load_lora_weights(str(file), adapter_name="a")
    wrapped = _wrapped(pipe)
    live = _uint8(pipe)
    pipe.set_adapters(["a"], [1.0])
    pipe.fuse_lora(adapter_names=["a"])
    return wrapped, live, _uint8(pipe), said


def _check_case(tmp_path, unet, te, variant):
    path, expected, trained = make_adapter(tmp_path, unet, te, variant)
    assert len(trained) > 0
    wrapped, live, fused, said = _plain_diffusers(path)
    assert faults(said, te != "off") == []
    assert wrapped == trained
    assert np.abs(live - expected).max() <= 1
    assert np.abs(fused - expected).max() <= 1

    ours = build_tiny_pipeline("sd1")
    load_adapters(ours, [(str(path), 1.0)])  # what `sdtune generate --lora` runs
    assert _wrapped(ours) == trained
    assert np.abs(_uint8(ours) - expected).max() <= 1

    kohya_out = tmp_path / "kohya.safetensors"
    if variant == "dora":
        with pytest.raises(SdtuneError, match="DoRA"):
            export_kohya(path, kohya_out, "sd1", base=build_tiny_pipeline("sd1"))
        return len(trained)
    kohya = export_kohya(path, kohya_out, "sd1", base=build_tiny_pipeline("sd1"))
    wrapped, live, fused, said = _plain_diffusers(kohya)
    assert faults(said, te != "off") == []
    assert wrapped == trained
    assert np.abs(live - expected).max() <= 1
    assert np.abs(fused - expected).max() <= 1
    return len(trained)


@pytest.mark.parametrize(("unet", "te", "variant"), DEFAULT)
def test_adapter_loads_whole_in_plain_diffusers(tmp_path, unet, te, variant):
    _check_case(tmp_path, unet, te, variant)


@pytest.mark.slow
@pytest.mark.parametrize(("unet", "te", "variant"), FULL)
def test_adapter_loads_whole_in_plain_diffusers_full_matrix(tmp_path, unet, te, variant):
    _check_case(tmp_path, unet, te, variant)


def test_check_says_the_diffusers_file_is_for_diffusers_and_the_kohya_file_for_the_uis(tmp_path):
    path, _, trained = make_adapter(tmp_path, "attn-ff", "attn-mlp", "alpha2x")
    base = build_tiny_pipeline("sd1")
    report = check_adapter(path, base=base)
    by = {r.consumer: r for r in report.results}
    assert report.ok and by["diffusers"].loaded == len(trained)
    comfy = by["ComfyUI/Forge"]
    assert not comfy.meant_for and comfy.loaded == 0  # attention keys unmapped, alpha ignored
    assert any(".attn1.to_q" in m for m in comfy.not_loaded)
    assert any("(1 instead of 2)" in m for m in comfy.wrong_strength)
    assert by["AUTOMATIC1111"].loaded == 0
    assert "use the kohya file" in report.format_table()

    kohya = export_kohya(path, tmp_path / "k.safetensors", "sd1", base=base)
    report = check_adapter(kohya, base=base)
    assert report.ok
    assert {r.consumer: r.loaded for r in report.results} == {
        "diffusers": len(trained),
        "AUTOMATIC1111": len(trained),
        "ComfyUI/Forge": len(trained),
    }
