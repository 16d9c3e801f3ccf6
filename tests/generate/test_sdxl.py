"""SDXL generation on tiny models: the same image as diffusers' own pipeline, every mode (the
inpainting model and the latent-mask fallback), adapters on both text encoders live or fused,
every scheduler, and the refiner as a second stage, through the library and the command."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.cli.main import main
from sdtune.errors import SdtuneError
from sdtune.generate.adapters import (
    fuse_adapters,
    is_fused,
    set_adapter_weights,
    unload_adapters,
)
from sdtune.generate.modes import MODES, modes_of_family
from sdtune.generate.run import (
    GenerationRequest,
    build_generation_job,
    build_generation_params,
    generate,
    generate_to_folder,
    save_result,
)
from sdtune.generate.schedulers import SCHEDULERS, get_scheduler_choice
from sdtune.generate.schema import check_generation_values
from sdtune.generate.txt2img import load_adapters
from sdtune.models.families import get_family
from tests.generate.a1111_infotext import parse_infotext
from tests.generate.conftest import tiny

PROMPT = "a red star"
# Measured: fused vs live max |diff| 2e-6 on [0, 1] pixels, unloaded vs base 2e-6.
FUSED_ATOL = 1e-4


def _req(**fields) -> GenerationRequest:
    values = {"prompt": PROMPT, "steps": 3, "seeds": [5], "output_type": "np", **fields}
    return GenerationRequest(**values)


def _read(path) -> dict[str, str]:
    return parse_infotext(Image.open(path).text["parameters"])


@pytest.fixture(scope="module")
def xl_dir(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    tiny_pipe("sdxl").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refiner_dir(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sdxl-refiner")
    tiny_pipe("sdxl-refiner").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory):
    """A LoRA on the U-Net and both text encoders of a tiny SDXL (random B: not a no-op),
    written by diffusers' own `StableDiffusionXLPipeline.save_lora_weights`."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny("sdxl")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"]))
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=text_targets))
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    parts["text_encoder_2"] = pipe.text_encoder_2
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in parts.values():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        **{f"{p}_lora_layers": get_peft_model_state_dict(m) for p, m in parts.items()},
        **{
            f"{p}_lora_adapter_metadata": m.peft_config["default"].to_dict()
            for p, m in parts.items()
        },
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_txt2img_is_diffusers_own_image(tiny_pipe):
    """Prompts go through sdtune's encoding (both encoders, the pooled embedding; an empty
    negative prompt zeroed as the model asks) and give diffusers' own image for the seed."""
    pipe = tiny_pipe("sdxl")
    for negative in ("", "blurry, dark"):
        ours = generate(pipe, _req(negative_prompt=negative)).images[0]
        theirs = pipe(
            prompt=PROMPT,
            negative_prompt=negative or None,
            num_inference_steps=3,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        ).images[0]
        assert ours.shape == (64, 64, 3)  # the model's own size when none is given
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_long_prompts_are_encoded_in_windows(tiny_pipe):
    pipe = tiny_pipe("sdxl")
    long = " ".join(["a red star on a blue sky"] * 15) + " with a green moon"  # > 75 tokens
    short = generate(pipe, _req(prompt=long, steps=2)).images[0]
    windows = generate(pipe, _req(prompt=long, steps=2, max_token_length=150)).images[0]
    assert np.isfinite(windows).all() and np.abs(windows - short).max() > 1e-3


def test_sdxl_families_modes_and_native_size():
    assert modes_of_family("sdxl") == ["txt2img", "img2img", "inpaint"]
    assert modes_of_family("sdxl-inpaint") == ["inpaint"]
    assert modes_of_family("sdxl-refiner") == ["img2img"]
    assert [MODES[m].pipeline_class_for("sdxl") for m in modes_of_family("sdxl")] == [
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ]
    assert MODES["txt2img"].pipeline_class_for("sd1") == "StableDiffusionPipeline"
    # Unset sizes are the model's own: the U-Net's sample size in pixels, 1024 for SDXL 1.0.
    from sdtune.models.build import load_family_configs

    unet = load_family_configs(get_family("sdxl"))["unet"]
    assert unet["sample_size"] * 8 == get_family("sdxl").resolution == 1024


MODE_CASES = {
    "img2img-sdxl": ("sdxl", "img2img"),
    "inpaint-sdxl-inpaint": ("sdxl-inpaint", "inpaint"),
    "inpaint-sdxl-latent-mask": ("sdxl", "inpaint"),
    "img2img-sdxl-refiner": ("sdxl-refiner", "img2img"),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_runs_and_is_seeded(case, tiny_pipe, rgb64, mask64):
    family, mode = MODE_CASES[case]
    pipe = tiny_pipe(family)
    req = _req(mode=mode, image=rgb64, mask=mask64, strength=0.75)
    image = generate(pipe, req).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_array_equal(generate(pipe, req).images[0], image)
    other = generate(pipe, replace(req, seeds=[6])).images[0]
    changed = np.abs(other - image)
    assert changed.max() > 1e-3
    if case == "inpaint-sdxl-latent-mask":  # the known region keeps the input's latents
        corners = [changed[:8, :8], changed[:8, -8:], changed[-8:, :8], changed[-8:, -8:]]
        assert max(c.max() for c in corners) < 0.2 * changed[24:40, 24:40].max()


def test_adapter_on_both_text_encoders_live_and_fused_in_every_mode(xl_lora, rgb64, mask64):
    """A diffusers-made SDXL LoRA (U-Net, text_encoder, text_encoder_2) changes every mode's
    image; fused it draws the live image; unloaded, the base image again."""
    pipe = tiny("sdxl")
    reqs = [_req(steps=2, mode=m, image=rgb64, mask=mask64) for m in modes_of_family("sdxl")]
    base = [generate(pipe, r).images[0] for r in reqs]
    pipe.load_lora_weights(str(xl_lora), adapter_name="adapter_0")
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    live = [generate(pipe, r).images[0] for r in reqs]
    for before, after in zip(base, live, strict=True):
        assert np.abs(after - before).max() > 1e-2, "the adapter does not change the output"
    fuse_adapters(pipe)
    assert is_fused(pipe)
    with pytest.raises(SdtuneError, match="unfuse them before reweighting"):
        set_adapter_weights(pipe, [0.5])
    for r, expected in zip(reqs, live, strict=True):
        np.testing.assert_allclose(generate(pipe, r).images[0], expected, atol=FUSED_ATOL)
    unload_adapters(pipe)
    for r, expected in zip(reqs, base, strict=True):
        np.testing.assert_allclose(generate(pipe, r).images[0], expected, atol=FUSED_ATOL)


def test_text_encoder_2_alone_counts_as_fused(xl_lora):
    from safetensors.torch import load_file

    pipe = tiny("sdxl")
    second = {k: v for k, v in load_file(xl_lora).items() if k.startswith("text_encoder_2.")}
    pipe.load_lora_weights(second, adapter_name="adapter_0")
    assert list(pipe.get_list_adapters()) == ["text_encoder_2"] and not is_fused(pipe)
    fuse_adapters(pipe)
    assert is_fused(pipe)


def test_sdxl_adapter_file_through_sdtune_loader_fused_equals_live(xl_lora):
    pipe = tiny("sdxl")
    req = _req(steps=2)
    load_adapters(pipe, [(str(xl_lora), 1.0)])
    live = generate(pipe, req).images[0]
    fuse_adapters(pipe)
    np.testing.assert_allclose(generate(pipe, req).images[0], live, atol=FUSED_ATOL)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_draws_and_is_named(name, tiny_pipe, tmp_path):
    pipe = tiny_pipe("sdxl")
    req = _req(steps=2, scheduler=name)
    result = generate(pipe, req)
    assert result.images[0].shape == (64, 64, 3) and np.isfinite(result.images[0]).all()
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # the base is untouched
    params = build_generation_params(pipe, req, result, "sdxl", [], 0)
    choice = get_scheduler_choice(name)
    assert (params.scheduler, params.schedule_type) == (
        choice.a1111_sampler,
        choice.a1111_schedule,
    )


def test_refiner_takes_over_as_diffusers_two_stages_do(tiny_pipe):
    base, refiner = tiny_pipe("sdxl"), tiny_pipe("sdxl-refiner")
    req = _req(steps=4, refiner_start=0.7)
    result = generate(base, req, refiner)
    generator = torch.Generator().manual_seed(5)  # one generator per image, both stages
    common = {"num_inference_steps": 4, "guidance_scale": 7.5, "generator": generator}
    latents = base(prompt=PROMPT, denoising_end=0.7, output_type="latent", **common).images
    theirs = refiner(
        prompt=PROMPT, image=latents, denoising_start=0.7, output_type="np", **common
    ).images[0]
    np.testing.assert_allclose(result.images[0], theirs, atol=1e-6)
    assert result.refiner_start == 0.7
    alone = generate(base, _req(steps=4)).images[0]
    assert np.abs(alone - result.images[0]).max() > 1e-3


@pytest.mark.parametrize("family,mode", [("sdxl", "img2img"), ("sdxl-inpaint", "inpaint")])
def test_refiner_follows_img2img_and_inpaint(family, mode, tiny_pipe, rgb64, mask64):
    req = _req(steps=4, mode=mode, image=rgb64, mask=mask64, strength=0.9)
    image = generate(tiny_pipe(family), req, tiny_pipe("sdxl-refiner")).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_refiner_misuse_is_refused_clearly(tiny_pipe, tiny_sd1_dir, xl_dir, rgb64, tmp_path):
    base, refiner = tiny_pipe("sdxl"), tiny_pipe("sdxl-refiner")
    with pytest.raises(SdtuneError, match="needs an SDXL base model .* is 'sd1'"):
        generate(tiny_pipe("sd1"), _req(), refiner)
    with pytest.raises(SdtuneError, match="must be an SDXL refiner model .* it is 'sdxl'"):
        generate(base, _req(), base)
    with pytest.raises(SdtuneError, match="--snapshots are not taken across"):
        generate(base, _req(snapshots=[0.5]), refiner)
    with pytest.raises(SdtuneError, match="give --strength above 0.2"):
        generate(base, _req(mode="img2img", image=rgb64, strength=0.1), refiner)
    for start in (0.0, 1.0, 1.5):
        with pytest.raises(SdtuneError, match=r"--refiner-start must be in \(0, 1\)"):
            build_generation_job({"prompt": "x", "refiner": "r", "refiner_start": start})
    problems = check_generation_values({"prompt": "x", "family": "sd1", "refiner": "r"})
    assert "needs an SDXL base model" in problems["refiner"]
    problems = check_generation_values({"prompt": "x", "mode": "upscale", "refiner": "r"})
    assert "not mode 'upscale'" in problems["refiner"]
    # Folders are checked from their configs, before any weights load.
    for model, other, message in (
        (tiny_sd1_dir, xl_dir, "needs an SDXL base model"),
        (xl_dir, xl_dir, "must be an SDXL refiner model"),
    ):
        job = build_generation_job(
            {"prompt": "x", "model": str(model), "refiner": str(other), "out": str(tmp_path)}
        )
        with pytest.raises(SdtuneError, match=message):
            generate_to_folder(job)


def test_pngs_name_what_made_them_as_for_sd(tiny_pipe, tmp_path):
    pipe = tiny_pipe("sdxl")
    req = _req(steps=2, seeds=[3], negative_prompt="blurry", output_type="pil")
    (path,) = save_result(pipe, req, generate(pipe, req), tmp_path, "models/xl", [])
    assert _read(path) == {
        "Prompt": PROMPT,
        "Negative prompt": "blurry",
        "Steps": "2",
        "Sampler": "Euler",  # the model's own EulerDiscreteScheduler
        "CFG scale": "7.5",
        "Seed": "3",
        "Size-1": "64",  # the tiny model's own size (1024 for SDXL 1.0)
        "Size-2": "64",
        "Model": "models/xl",
        "Generator": "sdtune",
    }


def test_command_draws_sdxl_with_a_refiner(xl_dir, refiner_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(xl_dir), "--prompt", "a red star, bright", "--steps", "4"]
    argv += ["--seed", "3", "--refiner", str(refiner_dir), "--refiner-start", "0.75"]
    argv += ["--scheduler", "dpm++2m-karras", "--out", str(tmp_path)]
    assert main(argv) == 0
    (path,) = capsys.readouterr().out.split()
    assert _read(path) == {
        "Prompt": "a red star, bright",
        "Negative prompt": "",
        "Steps": "4",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.5",
        "Seed": "3",
        "Size-1": "64",
        "Size-2": "64",
        "Model": str(xl_dir),
        "Refiner": str(refiner_dir),
        "Refiner switch at": "0.75",
        "Generator": "sdtune",
    }


def test_size_and_crop_conditioning_is_diffusers_own_in_its_order(tiny_pipe):
    """--original-size W,H, --target-size W,H and --crop-top-left X,Y reach the U-Net as
    diffusers' (height, width) and (top, left): the same image as diffusers given those."""
    pipe = tiny_pipe("sdxl")
    told = {"original_size": [96, 48], "target_size": [64, 32], "crop_top_left": [8, 16]}
    ours = generate(pipe, _req(**told)).images[0]
    theirs = pipe(
        prompt=PROMPT,
        num_inference_steps=3,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
        original_size=(48, 96),
        target_size=(32, 64),
        crops_coords_top_left=(16, 8),
    ).images[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    plain = generate(pipe, _req()).images[0]
    assert np.abs(ours - plain).max() > 1e-3  # the conditioning changes the image
    req = _req(**told, output_type="pil")
    params = build_generation_params(pipe, req, generate(pipe, req), "tiny", [], 0)
    assert params.extra["Original size"] == "96x48" and params.extra["Target size"] == "64x32"
    assert params.extra["Crop top left"] == "8,16"


def test_the_refiner_takes_its_aesthetic_scores_as_diffusers_does(tiny_pipe):
    base, refiner = tiny_pipe("sdxl"), tiny_pipe("sdxl-refiner")
    req = _req(steps=4, refiner_start=0.5, aesthetic_score=3.0, negative_aesthetic_score=1.0)
    ours = generate(base, req, refiner).images[0]
    generator = torch.Generator().manual_seed(5)
    common = {"num_inference_steps": 4, "guidance_scale": 7.5, "generator": generator}
    latents = base(prompt=PROMPT, denoising_end=0.5, output_type="latent", **common).images
    theirs = refiner(
        prompt=PROMPT, image=latents, denoising_start=0.5, output_type="np",
        aesthetic_score=3.0, negative_aesthetic_score=1.0, **common,
    ).images[0]  # fmt: skip
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    default = generate(base, _req(steps=4, refiner_start=0.5), refiner).images[0]
    assert np.abs(ours - default).max() > 1e-4


def test_sdxl_conditioning_on_sd1_is_refused(tiny_pipe):
    with pytest.raises(SdtuneError, match=r"--original-size is SDXL micro-conditioning.*'sd1'"):
        generate(tiny_pipe("sd1"), _req(original_size=[512, 512]))
    problems = check_generation_values({"prompt": "x", "target_size": "64"})
    assert "--target-size takes a width and a height" in problems["target_size"]


def test_the_refiner_holds_the_bases_vae_and_bigg_once_and_draws_the_same(
    xl_dir, refiner_dir, xl_lora
):
    """The published refiner's VAE and OpenCLIP bigG are the base's (so are the tiny ones):
    loaded next to the base they are the base's modules, and the two-stage image is the one
    drawn with separate copies. A base part an adapter changes is not shared."""
    from sdtune.generate.run import load_base, load_refiner

    base = load_base(str(xl_dir))
    shared = load_refiner(str(refiner_dir), base=base)
    assert shared.vae is base.vae and shared.text_encoder_2 is base.text_encoder_2
    apart = load_refiner(str(refiner_dir))
    req = _req(steps=4, refiner_start=0.6)
    np.testing.assert_array_equal(
        generate(base, req, shared).images[0], generate(base, req, apart).images[0]
    )
    adapted = load_base(str(xl_dir), adapters=[(str(xl_lora), 1.0)])  # LoRA on bigG too
    refiner = load_refiner(str(refiner_dir), base=adapted)
    assert refiner.vae is adapted.vae and refiner.text_encoder_2 is not adapted.text_encoder_2


def test_a_single_file_of_its_own_architecture_generates_with_config_dir(xl_dir, tmp_path):
    """`sdtune generate --model FILE --config-dir FOLDER`: the folder's image; without the
    folder, the error says which option to give."""
    from sdtune.generate.run import load_base
    from sdtune.models.original_layout import save_original_checkpoint

    file = save_original_checkpoint(load_base(str(xl_dir)), tmp_path / "m.safetensors")
    values = {"prompt": PROMPT, "steps": 2, "seed": 3, "width": 64, "height": 64}
    folder = generate_to_folder(
        build_generation_job({**values, "model": str(xl_dir), "out": str(tmp_path / "a")})
    )
    single = generate_to_folder(
        build_generation_job(
            {**values, "model": str(file), "config_dir": str(xl_dir), "out": str(tmp_path / "b")}
        )
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(folder[0])), np.asarray(Image.open(single[0]))
    )
    with pytest.raises(SdtuneError, match=r"--config-dir"):
        generate_to_folder(build_generation_job({**values, "model": str(file), "out": "c"}))
