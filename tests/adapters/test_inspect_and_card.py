import pytest
import torch
import yaml
from safetensors.torch import save_file

from sdtune.adapters.card import build_model_card
from sdtune.adapters.inspect import inspect_adapter
from sdtune.adapters.io import save_adapter
from sdtune.cli.main import main
from sdtune.config import load_config
from sdtune.errors import SdtuneError
from sdtune.models.tiny import build_tiny_pipeline
from sdtune.train.setup import add_lora_adapters


@pytest.fixture(scope="module")
def sdtune_adapter(tmp_path_factory):
    pipe = build_tiny_pipeline("sd1")
    cfg = load_config(
        None,
        {
            "model.path": "m",
            "data.dir": "d",
            "lora.rank": 4,
            "lora.alpha": 2,
            "lora.unet_targets": "cross-attn",
            "lora.train_text_encoder": True,
        },
    )
    add_lora_adapters(pipe, cfg)
    folder = tmp_path_factory.mktemp("adapter")
    return save_adapter(folder, pipe.unet, pipe.text_encoder, {"family": "sd1", "trigger": "sks"})


def test_inspect_reports_our_adapter(sdtune_adapter):
    s = inspect_adapter(sdtune_adapter.parent)  # a run folder works as well as the file
    assert (s.format, s.family) == ("diffusers", "sd1")
    assert set(s.ranks) == {4} and set(s.alphas) == {"2"}
    assert set(s.targets) == {
        "unet attn2.to_q",
        "unet attn2.to_k",
        "unet attn2.to_v",
        "unet attn2.to_out",
        "text q_proj",
        "text k_proj",
        "text v_proj",
        "text out_proj",
    }
    assert s.metadata["trigger"] == "sks"
    assert s.parameters > 0 and s.modules == sum(s.targets.values())


def test_inspect_reads_kohya_files_and_guesses_the_family(tmp_path):
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {
        f"{base}.lora_down.weight": torch.zeros(8, 1024),
        f"{base}.lora_up.weight": torch.zeros(320, 8),
        f"{base}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(tmp_path / "style.safetensors"))
    s = inspect_adapter(tmp_path / "style.safetensors")
    assert (s.format, s.family, dict(s.ranks), dict(s.alphas)) == ("kohya", "sd2", {8: 1}, {"4": 1})
    assert dict(s.targets) == {"unet attn2.to_k": 1}


def test_inspect_rejects_files_that_are_not_adapters(tmp_path):
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(SdtuneError, match="not a readable safetensors"):
        inspect_adapter(tmp_path / "torn.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SdtuneError, match="no LoRA keys"):
        inspect_adapter(tmp_path / "model.safetensors")


def test_inspect_command_prints_the_table(sdtune_adapter, capsys):
    assert main(["inspect", str(sdtune_adapter)]) == 0
    out = capsys.readouterr().out
    assert "format      diffusers" in out and "trigger" in out


def test_model_card_header_is_hub_yaml(tmp_path):
    info = {
        "family": "sd1",
        "base_model": "runwayml/stable-diffusion-v1-5",
        "trigger": "sks",
        "rank": 16,
        "prediction_type": "epsilon",
    }
    card = build_model_card(info)
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "runwayml/stable-diffusion-v1-5"
    assert header["instance_prompt"] == "sks" and "lora" in header["tags"]
    assert "load_lora_weights" in card and "| rank | `16` |" in card
    local = build_model_card({**info, "base_model": str(tmp_path)})
    assert "base_model" not in yaml.safe_load(local.split("---")[1])  # local paths are not hub ids
