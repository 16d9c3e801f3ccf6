import json
import shutil

import huggingface_hub.constants as hub_constants
import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.models.loading import load_pipeline


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("tiny-sd1")
    tiny_pipe("sd1").save_pretrained(folder)
    return folder


def test_local_folder_loads_in_its_family_pipeline(tiny_pipe, sd1_folder):
    pipe = load_pipeline(sd1_folder, torch_dtype=torch.float16, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float16
    assert pipe.safety_checker is None
    ours = tiny_pipe("sd1").unet.state_dict()
    assert all(torch.equal(v.half(), pipe.unet.state_dict()[k]) for k, v in ours.items())


def test_inpaint_folder_gets_the_inpaint_pipeline(tiny_pipe, tmp_path):
    tiny_pipe("sd2-inpaint").save_pretrained(tmp_path)
    assert type(load_pipeline(tmp_path)).__name__ == "StableDiffusionInpaintPipeline"


def test_family_that_does_not_fit_is_refused(sd1_folder):
    with pytest.raises(SdtuneError, match="family 'sd1-inpaint' does not fit.*'sd1'"):
        load_pipeline(sd1_folder, family="sd1-inpaint")


def test_explicit_sd2_v_family_sets_v_prediction(tiny_pipe, tmp_path):
    tiny_pipe("sd2-base").save_pretrained(tmp_path)
    assert load_pipeline(tmp_path).scheduler.config.prediction_type == "epsilon"
    pipe = load_pipeline(tmp_path, family="sd2-v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(SdtuneError, match=f"model '{missing}' not found"):
        load_pipeline(missing)
    with pytest.raises(SdtuneError, match="not found"):
        load_pipeline("./no/such/model")


def test_folder_without_model_index_and_unknown_file_type(tmp_path):
    with pytest.raises(SdtuneError, match="no model_index.json"):
        load_pipeline(tmp_path)
    weird = tmp_path / "model.onnx"
    weird.write_bytes(b"\0")
    with pytest.raises(SdtuneError, match="unsupported checkpoint type '.onnx'"):
        load_pipeline(weird)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache at tmp_path, with the library in offline mode."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_the_cache_offline(tiny_pipe, offline_hub_cache):
    repo = offline_hub_cache / "models--org--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny_pipe("sd2-v").save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = load_pipeline("org/tiny-sd")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe("sd2-v").unet.conv_in.weight)


def test_hub_id_not_cached_offline_says_how_to_download(offline_hub_cache):
    with pytest.raises(SdtuneError) as info:
        load_pipeline("org/not-cached")
    message = str(info.value)
    assert "cannot fetch 'org/not-cached'" in message
    assert "hf download org/not-cached" in message
    assert "\n" not in message


def _declare(folder, name, spec):
    index = json.loads((folder / "model_index.json").read_text())
    index[name] = spec
    (folder / "model_index.json").write_text(json.dumps(index))


def test_depth_folder_naming_the_removed_dpt_feature_extractor_loads(tiny_pipe, tmp_path):
    # stabilityai/stable-diffusion-2-depth declares DPTFeatureExtractor, gone in transformers 5
    tiny_pipe("sd2-depth").save_pretrained(tmp_path)
    _declare(tmp_path, "feature_extractor", ["transformers", "DPTFeatureExtractor"])
    pipe = load_pipeline(tmp_path)
    assert "DPTImageProcessor" in type(pipe.feature_extractor).__name__


def test_single_file_with_config_naming_clip_feature_extractor(tiny_pipe, tmp_path):
    # runwayml/stable-diffusion-v1-5 declares CLIPFeatureExtractor
    from sdtune.models.families import get_family
    from sdtune.models.original_layout import save_original_checkpoint

    folder = tmp_path / "config"
    tiny_pipe("sd1").save_pretrained(folder)
    shutil.copytree(
        get_family("sd1").config_dir / "feature_extractor", folder / "feature_extractor"
    )
    _declare(folder, "feature_extractor", ["transformers", "CLIPFeatureExtractor"])
    file = save_original_checkpoint(tiny_pipe("sd1"), tmp_path / "m.safetensors")
    pipe = load_pipeline(file, config_dir=folder)
    assert "CLIPImageProcessor" in type(pipe.feature_extractor).__name__
