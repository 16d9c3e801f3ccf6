import json

import pytest

from sdtune.errors import SdtuneError
from sdtune.models.families import (
    FAMILIES,
    build_pipeline_from_config,
    detect_family,
    detect_family_from_folder,
    get_family,
    match_family,
    write_config_folder,
)

# family: (U-Net in-channels, cross-attention dim, prediction type, U-Net sample size)
EXPECTED = {
    "sd1": (4, 768, "epsilon", 64),
    "sd1-inpaint": (9, 768, "epsilon", 64),
    "sd2-base": (4, 1024, "epsilon", 64),
    "sd2-v": (4, 1024, "v_prediction", 96),
    "sd2-inpaint": (9, 1024, "epsilon", 64),
    "sd2-depth": (5, 1024, "epsilon", 64),
    "sd2-upscale": (7, 1024, "v_prediction", 128),
    "sdxl": (4, 2048, "epsilon", 128),
    "sdxl-inpaint": (9, 2048, "epsilon", 128),
    "sdxl-refiner": (4, 1280, "epsilon", 128),
}


# family: (text encoders, U-Net inputs beside the latents, extra channels, micro-conditioning)
CAPABILITIES = {
    "sd1": (("text_encoder",), (), 0, False),
    "sd1-inpaint": (("text_encoder",), (("mask", 1), ("masked_image_latents", 4)), 5, False),
    "sd2-base": (("text_encoder",), (), 0, False),
    "sd2-v": (("text_encoder",), (), 0, False),
    "sd2-inpaint": (("text_encoder",), (("mask", 1), ("masked_image_latents", 4)), 5, False),
    "sd2-depth": (("text_encoder",), (("depth", 1),), 1, False),
    "sd2-upscale": (("text_encoder",), (("low_res_image", 3),), 3, False),
    "sdxl": (("text_encoder", "text_encoder_2"), (), 0, True),
    "sdxl-inpaint": (
        ("text_encoder", "text_encoder_2"),
        (("mask", 1), ("masked_image_latents", 4)),
        5,
        True,
    ),
    "sdxl-refiner": (("text_encoder_2",), (), 0, True),
}


def test_every_family_is_covered():
    assert set(FAMILIES) == set(EXPECTED) == set(CAPABILITIES)


@pytest.mark.parametrize("name", sorted(CAPABILITIES))
def test_each_family_declares_its_capabilities(tiny_pipe, name):
    family = get_family(name)
    encoders, extra_inputs, extra_channels, micro = CAPABILITIES[name]
    assert family.text_encoders == encoders
    assert family.extra_inputs == extra_inputs
    assert family.extra_in_channels == extra_channels
    assert family.unet_in_channels == 4 + extra_channels
    assert family.micro_conditioning is micro
    assert family.takes_inpaint_inputs is name.endswith("-inpaint")
    pipe = tiny_pipe(name)  # every declared text encoder is a part of the family's pipeline
    assert all(getattr(pipe, part, None) is not None for part in family.text_encoders)
    assert pipe.unet.config.in_channels == family.unet_in_channels


def test_parts_that_contradict_the_unet_inputs_are_an_error_naming_both():
    # A depth estimator beside a plain 4-channel U-Net: the parts say depth, the U-Net does not.
    with pytest.raises(
        SdtuneError,
        match=r"m: its U-Net takes 4 input channels, but family 'sd2-depth' feeds "
        r"4 latent \+ 1 depth = 5",
    ):
        match_family(4, True, "epsilon", has_depth_estimator=True, source="m")
    with pytest.raises(
        SdtuneError, match=r"m: U-Net with 6 input channels.*\(expected 4, 5, 7 or 9\)"
    ):
        match_family(6, False, "epsilon", source="m")


def test_trainable_families_are_those_whose_inputs_the_loop_makes():
    from sdtune.train.setup import TRAINABLE_FAMILIES

    assert set(TRAINABLE_FAMILIES) == {
        "sd1",
        "sd2-base",
        "sd2-v",
        "sd1-inpaint",
        "sd2-inpaint",
        "sdxl",
        "sdxl-inpaint",
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_configs_load_and_match_the_family(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    family = get_family(name)
    unet = UNet2DConditionModel.load_config(family.config_dir / "unet")
    vae = AutoencoderKL.load_config(family.config_dir / "vae")
    scheduler = json.loads((family.config_dir / "scheduler/scheduler_config.json").read_text())
    in_channels, context_dim, prediction, sample_size = EXPECTED[name]
    assert unet["in_channels"] == family.unet_in_channels == in_channels
    assert unet["cross_attention_dim"] == family.cross_attention_dim == context_dim
    assert scheduler["prediction_type"] == family.prediction_type == prediction
    assert unet["sample_size"] == sample_size
    assert unet["use_linear_projection"] is (family.line in ("sd2", "sdxl"))
    downsamplings = len(vae["block_out_channels"]) - 1
    assert downsamplings == (2 if name == "sd2-upscale" else 3)
    assert detect_family_from_folder(family.config_dir) is family


def test_upscaler_and_depth_configs_have_their_extras():
    up = get_family("sd2-upscale").config_dir
    unet = json.loads((up / "unet/config.json").read_text())
    assert unet["num_class_embeds"] == 1000
    assert json.loads((up / "vae/config.json").read_text())["scaling_factor"] == 0.08333
    index = json.loads((up / "model_index.json").read_text())
    assert index["max_noise_level"] == 350
    assert index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    depth = get_family("sd2-depth").config_dir
    dpt = json.loads((depth / "depth_estimator/config.json").read_text())
    assert dpt["model_type"] == "dpt" and dpt["is_hybrid"] is True


def test_unknown_family_names_the_valid_ones_and_a_close_match():
    with pytest.raises(SdtuneError, match=r"unknown model family 'sd15' \(did you mean 'sd1'"):
        get_family("sd15")
    with pytest.raises(SdtuneError, match="sd2-base.*sd2-v.*valid families: sd1, sd1-inpaint"):
        get_family("sd2")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detect_family_of_tiny_pipelines(tiny_pipe, name):
    pipe = tiny_pipe(name)
    assert detect_family(pipe).name == name
    assert type(pipe).__name__ == get_family(name).pipeline_class


@pytest.mark.parametrize(
    "name", ["sd1", "sd2-v", "sd2-depth", "sd2-upscale", "sdxl", "sdxl-refiner"]
)
def test_detect_family_from_saved_tiny_folder(tiny_pipe, tmp_path, name):
    tiny_pipe(name).save_pretrained(tmp_path)
    assert detect_family_from_folder(tmp_path).name == name
    assert detect_family(tmp_path).name == name


def test_detect_family_from_folder_without_model_index(tmp_path):
    with pytest.raises(SdtuneError, match="model_index.json is missing"):
        detect_family_from_folder(tmp_path)


def test_config_folder_has_tokenizer_with_family_padding(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_config_folder("sd2-v", tmp_path / "cfg")
    assert (folder / "unet/config.json").is_file()
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer").pad_token == "!"


def test_full_size_sd1_architecture_on_meta_device():
    pipe = build_pipeline_from_config("sd1", empty=True)
    params = sum(p.numel() for p in pipe.unet.parameters())
    assert params == 859_520_964  # the published SD 1.5 U-Net size
    assert next(pipe.unet.parameters()).device.type == "meta"
    assert pipe.safety_checker is None


def test_sdxl_full_size_parts_have_the_published_parameter_counts():
    """U-Net 2,567 M, CLIP ViT-L 123 M, OpenCLIP bigG 695 M, VAE 83.7 M (Podell et al. 2023)."""
    pipe = build_pipeline_from_config("sdxl", empty=True)
    counts = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "text_encoder", "text_encoder_2", "vae")
    }
    assert round(counts["unet"] / 1e6) == 2567
    assert round(counts["text_encoder"] / 1e6) == 123
    assert round(counts["text_encoder_2"] / 1e6) == 695
    assert round(counts["vae"] / 1e5) == 837
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"


def test_sdxl_base_and_refiner_are_told_apart_from_the_unet_config_alone():
    from sdtune.models.families import xl_kind

    configs = {
        n: json.loads((get_family(n).config_dir / "unet/config.json").read_text())
        for n in ("sdxl", "sdxl-inpaint", "sdxl-refiner", "sd1")
    }
    assert [xl_kind(c) for c in configs.values()] == ["base", "base", "refiner", None]
