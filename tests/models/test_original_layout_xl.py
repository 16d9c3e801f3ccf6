"""SDXL single-file checkpoints in the original (sgm / A1111 / ComfyUI) layout, both ways."""

import huggingface_hub.constants as hub_constants
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as diffusers_single_file
from safetensors.torch import save_file

from sdtune.errors import SdtuneError
from sdtune.models.build import build_pipeline
from sdtune.models.families import build_pipeline_from_config, get_family
from sdtune.models.loading import load_pipeline
from sdtune.models.original_layout import (
    CheckpointInfo,
    detect_family_from_checkpoint,
    load_original_state_dict,
    pipeline_to_original,
    read_checkpoint_info,
    save_original_checkpoint,
)
from sdtune.models.tiny import TINY_TEXT_WIDTH, tiny_family_configs

XL_PARTS = {
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "sdxl-inpaint": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "sdxl-refiner": ("unet", "vae", "text_encoder_2"),
}
BIGG_WIDTH = 48  # tiny bigG wider than tiny ViT-L, as 1280 is wider than 768


def _tiny_xl_with_distinct_widths(family: str):
    """A tiny SDXL whose bigG is wider than its ViT-L, as in the real model.

    diffusers' single-file loader tells the two encoders apart by width alone, so plain
    diffusers needs this to load a tiny SDXL file; sdtune also loads equal widths (below).
    """
    configs = tiny_family_configs(family)
    configs["text_encoder_2"].update(
        hidden_size=BIGG_WIDTH, intermediate_size=2 * BIGG_WIDTH, projection_dim=BIGG_WIDTH
    )
    unet = configs["unet"]
    extra = BIGG_WIDTH - TINY_TEXT_WIDTH
    unet["cross_attention_dim"] += extra
    unet["projection_class_embeddings_input_dim"] += extra  # the pooled text is bigG's
    pipe = build_pipeline(get_family(family), configs, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_same_weights(a, b, parts):
    for name in parts:
        ours, theirs = a.components[name].state_dict(), b.components[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"


def _strip_header(file, dest):
    """The same tensors with no sdtune header, as a third-party file would be."""
    save_file(load_original_state_dict(file), str(dest))
    return dest


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _image(pipe, family):
    from PIL import Image

    kwargs = dict(prompt="a red star", num_inference_steps=2, guidance_scale=1.0)
    kwargs.update(output_type="np", generator=torch.Generator().manual_seed(3))
    if family == "sdxl-inpaint":
        kwargs.update(image=Image.new("RGB", (64, 64), (90, 30, 200)))
        kwargs.update(mask_image=Image.new("L", (64, 64), 255), strength=1.0)
    return pipe(**kwargs).images[0]


@pytest.mark.parametrize("family", ["sdxl", "sdxl-inpaint"])
def test_single_file_gives_the_folders_image_in_sdtune_and_plain_diffusers(
    tmp_path, offline, family
):
    import diffusers

    pipe = _tiny_xl_with_distinct_widths(family)
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    file = _strip_header(
        save_original_checkpoint(pipe, tmp_path / "tmp.safetensors"), tmp_path / "m.safetensors"
    )
    expected = _image(pipe, family)

    ours = load_pipeline(file, config_dir=folder)
    cls = getattr(diffusers, get_family(family).pipeline_class)
    theirs = cls.from_single_file(str(file), config=str(folder), local_files_only=True)
    for loaded in (ours, theirs):
        assert type(loaded) is cls
        _assert_same_weights(pipe, loaded, XL_PARTS[family])
        loaded.set_progress_bar_config(disable=True)
        # equal weights; CPU kernels may round differently for differently laid-out tensors
        np.testing.assert_allclose(_image(loaded, family), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(XL_PARTS))
def test_tiny_sdxl_with_equal_encoder_widths_round_trips_exactly(tiny_pipe, tmp_path, family):
    pipe = tiny_pipe(family)
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    file = save_original_checkpoint(pipe, tmp_path / "m.safetensors")
    loaded = load_pipeline(file, config_dir=folder, torch_dtype=torch.float32)
    assert type(loaded) is type(pipe)
    _assert_same_weights(pipe, loaded, XL_PARTS[family])


@pytest.mark.parametrize("family", list(XL_PARTS))
def test_sdxl_families_are_told_from_checkpoint_keys(tiny_pipe, tmp_path, family):
    file = save_original_checkpoint(tiny_pipe(family), tmp_path / "m.safetensors")
    assert detect_family_from_checkpoint(read_checkpoint_info(file)).name == family
    plain = _strip_header(file, tmp_path / "plain.safetensors")
    assert detect_family_from_checkpoint(read_checkpoint_info(plain)).name == family
    # A U-Net alone (`label_emb.0.0`, not the x4 upscaler's `label_emb`) is still SDXL.
    unet_only = {k: v for k, v in load_original_state_dict(file).items() if k.startswith("model.")}
    info = CheckpointInfo(tmp_path / "unet.safetensors", {k: v.shape for k, v in unet_only.items()})
    expected = "sdxl" if family == "sdxl-refiner" else family  # tiny widths: no refiner's
    assert detect_family_from_checkpoint(info).name == expected


def test_v_prediction_sdxl_is_marked_and_reloads_as_v(tiny_pipe, tmp_path):
    base = tiny_pipe("sdxl")
    scheduler = type(base.scheduler).from_config(
        base.scheduler.config, prediction_type="v_prediction"
    )
    pipe = type(base)(**{**base.components, "scheduler": scheduler})
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    file = _strip_header(
        save_original_checkpoint(pipe, tmp_path / "tmp.safetensors"), tmp_path / "m.safetensors"
    )
    assert "v_pred" in read_checkpoint_info(file).shapes  # ComfyUI's mark
    family = detect_family_from_checkpoint(read_checkpoint_info(file))
    assert (family.name, family.prediction_type) == ("sdxl", "v_prediction")
    loaded = load_pipeline(file, config_dir=folder)
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_a_zero_terminal_snr_mark_gives_the_schedule_it_was_trained_on(tiny_pipe, tmp_path):
    """ComfyUI's "ztsnr" mark beside "v_pred" (v-prediction SDXL fine-tunes trained with zero
    terminal SNR): written from a rescaled schedule; read back as the rescaled, trailing schedule
    for sampling, and training's noise levels end at SNR 0."""
    from sdtune.config import RunConfig
    from sdtune.train.setup import build_objective

    base = tiny_pipe("sdxl")
    v = type(base.scheduler).from_config(base.scheduler.config, prediction_type="v_prediction")
    type(base)(**{**base.components, "scheduler": v}).save_pretrained(tmp_path / "v-folder")
    rescaled = type(v).from_config(v.config, rescale_betas_zero_snr=True)
    pipe = type(base)(**{**base.components, "scheduler": rescaled})
    file = _strip_header(
        save_original_checkpoint(pipe, tmp_path / "tmp.safetensors"), tmp_path / "m.safetensors"
    )
    assert {"v_pred", "ztsnr"} <= set(read_checkpoint_info(file).shapes)
    loaded = load_pipeline(file, config_dir=tmp_path / "v-folder")
    config = loaded.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert config.timestep_spacing == "trailing"
    assert float(build_objective(RunConfig(), loaded.scheduler).alphas_cumprod[-1]) == 0.0
    plain = save_original_checkpoint(
        type(base)(**{**base.components, "scheduler": v}), tmp_path / "v.safetensors"
    )
    assert "ztsnr" not in read_checkpoint_info(plain).shapes
    assert not load_pipeline(plain, config_dir=tmp_path / "v-folder").scheduler.config.get(
        "rescale_betas_zero_snr"
    )


def test_a_family_that_contradicts_the_file_names_both(tiny_pipe, tmp_path):
    xl = save_original_checkpoint(tiny_pipe("sdxl"), tmp_path / "xl.safetensors")
    with pytest.raises(
        SdtuneError, match=r"family 'sd1' does not fit.*'sdxl'.*'sd1': Stable Diffusion 1"
    ):
        load_pipeline(xl, family="sd1")
    with pytest.raises(SdtuneError, match="family 'sdxl-refiner' does not fit.*'sdxl'"):
        load_pipeline(xl, family="sdxl-refiner")
    sd1 = save_original_checkpoint(tiny_pipe("sd1"), tmp_path / "sd1.safetensors")
    with pytest.raises(
        SdtuneError, match=r"family 'sdxl' does not fit.*'sd1'.*'sdxl': Stable Diffusion XL"
    ):
        load_pipeline(sd1, family="sdxl")


@pytest.fixture(scope="module")
def full_size_xl():
    """The original-layout state dicts of full-size SDXL base and refiner, on the meta device."""
    found = {}
    for family in ("sdxl", "sdxl-refiner"):
        pipe = build_pipeline_from_config(family, empty=True)
        found[family] = (pipe, pipeline_to_original(pipe)[0])
    return found


def test_full_size_sdxl_key_set_is_what_diffusers_reads_as_xl_base(full_size_xl):
    pipe, state = full_size_xl["sdxl"]
    assert diffusers_single_file.infer_diffusers_model_type(state) == "xl_base"
    prefixes = (
        "model.",
        "first_stage_model.",
        "conditioner.embedders.0.",
        "conditioner.embedders.1.",
    )
    count = {p: sum(k.startswith(p) for k in state) for p in prefixes}
    # sd_xl_base_1.0.safetensors: 1680 + 248 + 197 + 390 = 2515 tensors
    assert list(count.values()) == [1680, 248, 197, 390] and len(state) == 2515
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (
            640,
            2048,
        ),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    _assert_diffusers_reads_every_weight(pipe, state, "conditioner.embedders.1.model.")
    # diffusers tells CLIP ViT-L from bigG by these keys' widths
    assert diffusers_single_file.is_clip_sdxl_model(state)
    assert diffusers_single_file.is_open_clip_sdxl_model(state)


def test_full_size_refiner_key_set_is_what_diffusers_reads_as_xl_refiner(full_size_xl, tmp_path):
    pipe, state = full_size_xl["sdxl-refiner"]
    assert diffusers_single_file.infer_diffusers_model_type(state) == "xl_refiner"
    assert not any(k.startswith("conditioner.embedders.0.transformer.") for k in state)
    _assert_diffusers_reads_every_weight(pipe, state, "conditioner.embedders.0.model.")
    unet_only = {k: tuple(v.shape) for k, v in state.items() if k.startswith("model.")}
    info = CheckpointInfo(tmp_path / "refiner-unet.safetensors", unet_only)
    assert detect_family_from_checkpoint(info).name == "sdxl-refiner"


def _assert_diffusers_reads_every_weight(pipe, state, bigg_prefix):
    """diffusers' own converters map the key set back onto every weight, shape for shape."""
    converted = {
        "unet": diffusers_single_file.convert_ldm_unet_checkpoint(state, pipe.unet.config),
        "vae": diffusers_single_file.convert_ldm_vae_checkpoint(state, pipe.vae.config),
        "text_encoder_2": diffusers_single_file.convert_open_clip_checkpoint(
            pipe.text_encoder_2, state, prefix=bigg_prefix
        ),
    }
    if pipe.text_encoder is not None:
        clip = diffusers_single_file.convert_ldm_clip_checkpoint(state)
        converted["text_encoder"] = {
            k.removeprefix("text_model."): v
            for k, v in clip.items()
            if not k.endswith("position_ids")
        }
    for part, weights in converted.items():
        expected = {k: tuple(v.shape) for k, v in pipe.components[part].state_dict().items()}
        assert {k: tuple(v.shape) for k, v in weights.items()} == expected, part


def _digests(module):
    """One SHA-1 per tensor: to compare ~7 GB of weights without holding two copies."""
    import hashlib

    return {
        key: (
            tuple(value.shape),
            hashlib.sha1(value.contiguous().view(torch.uint8).numpy()).hexdigest(),
        )
        for key, value in module.state_dict().items()
    }


@pytest.mark.slow
def test_full_size_sdxl_single_file_loads_with_the_shipped_configs(request, tmp_path, offline):
    """Full-size random SDXL -> fp16 original layout -> load offline with the shipped configs.

    ~7 GB of file and up to ~15 GB of memory, so it runs only when asked for with `-m slow`.
    """
    import gc

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size model; run with -m slow")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16: half the memory of fp32
    try:
        pipe = build_pipeline_from_config("sdxl")
    finally:
        torch.set_default_dtype(default)
    digests = {part: _digests(pipe.components[part]) for part in XL_PARTS["sdxl"]}
    file = save_original_checkpoint(pipe, tmp_path / "sd_xl_base_1.0.safetensors")
    del pipe
    gc.collect()
    info = read_checkpoint_info(file)
    assert detect_family_from_checkpoint(CheckpointInfo(file, info.shapes)).name == "sdxl"
    loaded = load_pipeline(file, torch_dtype=torch.float16)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    for part, expected in digests.items():
        assert _digests(loaded.components[part]) == expected, part
