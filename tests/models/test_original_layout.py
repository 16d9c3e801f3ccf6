import warnings

import pytest
import torch
from safetensors.torch import save_file

from sdtune.errors import SdtuneError
from sdtune.models.families import build_pipeline_from_config, get_family
from sdtune.models.loading import load_pipeline
from sdtune.models.original_layout import (
    detect_family_from_checkpoint,
    load_original_state_dict,
    pipeline_to_original,
    read_checkpoint_info,
    save_original_checkpoint,
)

PARTS = ("unet", "vae", "text_encoder")


def _assert_same_weights(a, b, parts=PARTS):
    for name in parts:
        ours, theirs = a.components[name].state_dict(), b.components[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"


@pytest.fixture
def saved(tiny_pipe, tmp_path):
    """`saved(family)`: (tiny pipe, its diffusers folder, its original-layout .safetensors)."""

    def save(family):
        pipe = tiny_pipe(family)
        folder = tmp_path / family
        pipe.save_pretrained(folder)
        return pipe, folder, save_original_checkpoint(pipe, tmp_path / f"{family}.safetensors")

    return save


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sd2-inpaint", "sd2-upscale"])
def test_single_file_round_trip_is_exact(saved, family):
    pipe, folder, file = saved(family)
    loaded = load_pipeline(file, config_dir=folder)
    assert type(loaded) is type(pipe)
    _assert_same_weights(pipe, loaded)
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


def test_depth_single_file_takes_the_estimator_from_the_config_folder(saved):
    pipe, folder, file = saved("sd2-depth")
    loaded = load_pipeline(file, config_dir=folder)
    assert type(loaded).__name__ == "StableDiffusionDepth2ImgPipeline"
    _assert_same_weights(pipe, loaded, PARTS + ("depth_estimator",))


def test_depth_single_file_without_estimator_says_what_is_missing(saved):
    _, _, file = saved("sd2-depth")
    with pytest.raises(SdtuneError, match="do not contain the DPT depth estimator"):
        load_pipeline(file, family="sd2-depth")


def test_original_key_names_and_shapes(tiny_pipe):
    sd1, _ = pipeline_to_original(tiny_pipe("sd1"))
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd1
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in sd1  # level without attention
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sd1  # level with attention
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    sd2, _ = pipeline_to_original(tiny_pipe("sd2-base"))
    fused = sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 32, 32)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)


def test_full_size_key_sets_match_the_published_checkpoints():
    sd1, _ = pipeline_to_original(build_pipeline_from_config("sd1", empty=True))
    count = {p: sum(k.startswith(p) for k in sd1) for p in ("model.", "first_stage", "cond_stage")}
    assert count == {"model.": 686, "first_stage": 248, "cond_stage": 196}
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    assert tuple(sd1[key].shape) == (320, 768)
    sd2, _ = pipeline_to_original(build_pipeline_from_config("sd2-v", empty=True))
    # OpenCLIP ViT-H has 24 blocks; the unused last one and text_projection are written too.
    last = "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"
    assert tuple(sd2[last].shape) == (3072, 1024)
    assert tuple(sd2["cond_stage_model.model.text_projection"].shape) == (1024, 1024)
    assert tuple(sd2["model.diffusion_model.middle_block.1.proj_in.weight"].shape) == (1280, 1280)


def test_dtype_casts_floating_weights(tiny_pipe, tmp_path):
    file = save_original_checkpoint(tiny_pipe("sd1"), tmp_path / "half.safetensors", torch.float16)
    state = load_original_state_dict(file)
    assert {v.dtype for v in state.values()} == {torch.float16}
    with pytest.raises(SdtuneError, match=r"\.safetensors only"):
        save_original_checkpoint(tiny_pipe("sd1"), tmp_path / "model.ckpt")


def test_ckpt_written_with_torch_save_loads_the_same(saved, tmp_path):
    pipe, folder, file = saved("sd1")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_original_state_dict(file), "global_step": 1000}, ckpt)
    assert load_original_state_dict(ckpt).keys() == load_original_state_dict(file).keys()
    _assert_same_weights(pipe, load_pipeline(ckpt, config_dir=folder))


class _Payload:
    """Unpickling this would call open(marker, "w"): a stand-in for code run by a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, evil)
    refused = "holds code or objects other than tensors and was not loaded"
    with pytest.raises(SdtuneError, match=refused) as info:
        load_original_state_dict(evil)
    message = str(info.value)  # one line, the reason, and none of torch's advice to unpickle
    assert "\n" not in message and "weights_only" not in message and "GLOBAL" in message
    with pytest.raises(SdtuneError, match=refused):
        load_pipeline(evil, family="sd1")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def _strip_family(file, dest):
    """The same tensors with no sdtune header, as a third-party file would be."""
    save_file(load_original_state_dict(file), str(dest))
    return dest


@pytest.mark.parametrize(
    "family", ["sd1", "sd1-inpaint", "sd2-inpaint", "sd2-depth", "sd2-upscale"]
)
def test_family_detection_from_checkpoint_keys(tiny_pipe, tmp_path, family):
    file = save_original_checkpoint(tiny_pipe(family), tmp_path / "m.safetensors")
    assert detect_family_from_checkpoint(read_checkpoint_info(file)).name == family
    plain = _strip_family(file, tmp_path / "plain.safetensors")
    assert detect_family_from_checkpoint(read_checkpoint_info(plain)).name == family


def test_sd2_eps_or_v_from_yaml_name_or_a_warning(tiny_pipe, tmp_path):
    file = save_original_checkpoint(tiny_pipe("sd2-v"), tmp_path / "tmp.safetensors")
    plain = _strip_family(file, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="family='sd2-v'"):
        assert detect_family_from_checkpoint(read_checkpoint_info(plain)).name == "sd2-base"
    named = _strip_family(file, tmp_path / "v2-1_768-ema-pruned.safetensors")
    assert detect_family_from_checkpoint(read_checkpoint_info(named)).name == "sd2-v"
    (tmp_path / "model.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect_family_from_checkpoint(read_checkpoint_info(plain)).name == "sd2-v"


def test_lora_file_is_not_a_base_model(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora
    )
    with pytest.raises(SdtuneError, match="LoRA"):
        load_pipeline(lora)


def test_unfused_lora_is_refused_with_the_fix(tmp_path):
    from peft import LoraConfig

    from sdtune.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    with pytest.raises(SdtuneError, match="fuse_lora"):
        save_original_checkpoint(pipe, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, name",
    [
        ("sd1", "model.safetensors"),
        ("sd2-v", "v2-1_768-ema-pruned.safetensors"),
        ("sd2-upscale", "x4-upscaler.safetensors"),
    ],
)
def test_full_size_single_file_round_trip_with_shipped_configs(request, tmp_path, family, name):
    """Full-size random weights -> fp16 original layout -> load with the shipped configs.

    ~1 minute and ~9 GB of memory per family, so it runs only when asked for with `-m slow`.
    """
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size model; run with -m slow")
    from safetensors.torch import save_file as write

    pipe = build_pipeline_from_config(family)
    file = save_original_checkpoint(pipe, tmp_path / name, dtype=torch.float16)
    write(load_original_state_dict(file), str(file))  # drop the sdtune header: detect from keys
    loaded = load_pipeline(file, torch_dtype=torch.float16)
    assert loaded.scheduler.config.prediction_type == get_family(family).prediction_type
    for part in PARTS:
        ours, theirs = pipe.components[part].state_dict(), loaded.components[part].state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k].half(), theirs[k]) for k in ours), part
