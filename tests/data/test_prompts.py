"""Long captions in windows of 75 tokens: exact token layout, unchanged short captions, the
same conditioning at training and generation time."""

import pytest
import torch

from sdtune.config import load_config
from sdtune.data.captions import warn_long_captions
from sdtune.data.prompts import encode_prompt_embeds, encode_token_windows, tokenize_prompts
from sdtune.errors import SdtuneError
from sdtune.models.tokenizer import load_tokenizer

BOS, EOS = 49406, 49407
PHOTO = [320, 1125, 539, 320, 2368]  # "a photo of a cat" in the CLIP vocabulary
LONG = " ".join(["a photo of a cat"] * 24)  # 120 caption tokens


@pytest.fixture(scope="module")
def tiny():
    from sdtune.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline("sd1", seed=0)


@pytest.mark.parametrize("sd_version, pad", [(1, EOS), (2, 0)])
def test_a_long_caption_is_cut_into_windows_of_75(sd_version, pad):
    tokenizer = load_tokenizer(sd_version)
    body = PHOTO * 24
    ids = tokenize_prompts(tokenizer, [LONG], 225)[0].tolist()
    assert len(ids) == 3 * 77
    assert ids[:77] == [BOS, *body[:75], EOS]
    assert ids[77:154] == [BOS, *body[75:], EOS] + [pad] * 30
    assert ids[154:] == [BOS, EOS] + [pad] * 75  # the third window is empty
    assert tokenize_prompts(tokenizer, [LONG], 150)[0].tolist() == ids[:154]


@pytest.mark.parametrize("sd_version", [1, 2])
def test_one_window_is_exactly_the_tokenizers_own_truncation(sd_version):
    tokenizer = load_tokenizer(sd_version)
    captions = ["a photo of a cat", "", LONG, "sks, a red star on a grey background"]
    plain = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(tokenize_prompts(tokenizer, captions, 75), plain)


def test_windows_are_encoded_apart_and_joined(tiny):
    encoder, tokenizer = tiny.text_encoder, tiny.tokenizer
    with torch.no_grad():
        short_ids = tokenize_prompts(tokenizer, ["a photo of a cat"], 75)
        assert torch.equal(encode_token_windows(encoder, short_ids), encoder(short_ids)[0])
        joined = encode_token_windows(encoder, tokenize_prompts(tokenizer, [LONG], 150))
        head = encoder(tokenize_prompts(tokenizer, [LONG], 75))[0]
        tail = encoder(tokenize_prompts(tokenizer, [" ".join(["a photo of a cat"] * 9)], 75))[0]
    assert joined.shape == (1, 154, encoder.config.hidden_size)
    torch.testing.assert_close(joined[:, :77], head, rtol=0, atol=1e-6)
    torch.testing.assert_close(joined[:, 77:], tail, rtol=0, atol=1e-6)


def test_generation_embeds_match_the_pipeline_and_take_windows(tiny):
    from sdtune.generate.run import GenerationRequest, generate

    prompt_embeds, negative = encode_prompt_embeds(tiny, ["a photo of a cat"], ["blurry"], 75)
    theirs, their_negative = tiny.encode_prompt("a photo of a cat", "cpu", 1, True, "blurry")
    assert torch.equal(prompt_embeds, theirs) and torch.equal(negative, their_negative)

    def draw(prompt, length):
        request = GenerationRequest(
            prompt=prompt, steps=2, seeds=[3], output_type="np", max_token_length=length
        )
        return generate(tiny, request).images[0]

    # The words past token 75 reach the image only with windows.
    cut = " ".join(["a photo of a cat"] * 15)
    assert (draw(LONG, 75) == draw(cut, 75)).all()
    assert not (draw(LONG, 150) == draw(cut, 150)).all()
    with pytest.raises(SdtuneError, match="max-token-length must be 75, 150 or 225"):
        draw(LONG, 100)


def test_long_captions_warn_once_and_windows_lift_the_limit(tmp_path, caplog):
    tokenizer = load_tokenizer(1)
    captions = ["a red star", LONG, LONG + " and more"]
    sources = [tmp_path / f"{n}.png" for n in "abc"]
    with caplog.at_level("WARNING", logger="sdtune.data"):
        assert warn_long_captions(captions, sources, tokenizer, 75) == 2
        assert warn_long_captions(captions, sources, tokenizer, 150) == 0
        assert warn_long_captions([LONG * 2], sources[:1], tokenizer, 150) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("2 of 3 captions are longer than 77 tokens")
    assert "data.max_token_length=150 or 225" in lines[0] and "b.png" in lines[0]
    assert "longer than 152 tokens" in lines[1]


def test_max_token_length_is_checked_before_any_model_loads():
    base = {"model.path": "m", "data.dir": "d"}
    assert load_config(None, {**base, "data.max_token_length": "150"}).data.max_token_length == 150
    with pytest.raises(SdtuneError, match=r"data.max_token_length must be 75, 150 or 225.*100"):
        load_config(None, {**base, "data.max_token_length": "100"})


def test_training_with_windows_and_generating_as_trained(tiny_sd1_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from sdtune.data.synthetic import write_shape_dataset
    from sdtune.generate.run import (
        build_generation_job,
        generate_to_folder,
        trained_max_token_length,
    )
    from sdtune.train.loop import train

    images = tmp_path / "images"
    for path in write_shape_dataset(images, count=4, size=64, seed=1):
        path.with_suffix(".txt").write_text(f"{LONG}, {path.stem}", encoding="utf-8")
    settings = {
        "model.path": str(tiny_sd1_dir),
        "data.dir": str(images),
        "data.resolution": 64,
        "data.max_token_length": 150,
        "data.cache_text_embeddings": True,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.batch_size": 2,
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "output.dir": str(tmp_path / "run"),
    }
    with caplog.at_level("WARNING", logger="sdtune.data"):
        result = train(load_config(None, settings))
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]  # all fit in 150
    entries = list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    assert len(entries) == 4 and load_file(str(entries[0]))["embeddings"].shape == (154, 32)
    adapter = load_file(str(result.adapter_path))
    assert any(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k or "up" in k)

    assert trained_max_token_length([(str(tmp_path / "run"), 1.0)]) == 150
    caplog.clear()
    with caplog.at_level("INFO", logger="sdtune.generate"):
        values = {"prompt": LONG, "out": str(tmp_path / "images-out"), "steps": 2}
        paths = generate_to_folder(
            build_generation_job({**values, "lora": [str(tmp_path / "run")]})
        )
    assert paths and "windows up to 150 tokens" in caplog.text


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner", "sd1"])
def test_conditioning_equals_what_the_diffusers_pipeline_computes(tiny_pipe, family):
    """Both SDXL encoders' penultimate states side by side and bigG's pooled projection; SD's
    one encoder's last states: exactly diffusers' own `encode_prompt`."""
    from sdtune.data.prompts import encode_prompt_conditioning

    pipe = tiny_pipe(family)
    ours, negative = encode_prompt_conditioning(pipe, ["a red ring"], ["blurry"], 75)
    theirs = pipe.encode_prompt(
        "a red ring",
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    assert torch.equal(ours.embeds, theirs[0]) and torch.equal(negative.embeds, theirs[1])
    if family.startswith("sdxl"):
        assert torch.equal(ours.pooled, theirs[2]) and torch.equal(negative.pooled, theirs[3])
    else:
        assert ours.pooled is None


def test_sdxl_long_prompts_keep_the_first_windows_pooled_embedding(tiny_pipe):
    from sdtune.data.prompts import encode_prompt_conditioning

    pipe = tiny_pipe("sdxl")
    short, _ = encode_prompt_conditioning(pipe, ["a red ring"], [""], 75)
    long, _ = encode_prompt_conditioning(pipe, ["a red ring"], [""], 150)
    assert long.embeds.shape == (1, 154, 64)
    # the same numbers, computed in a batch of two windows instead of one
    torch.testing.assert_close(long.embeds[:, :77], short.embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(long.pooled, short.pooled, rtol=0, atol=1e-5)


def test_time_ids_are_original_size_crop_and_target_size_in_that_order():
    from sdtune.data.prompts import compute_time_ids

    ids = compute_time_ids(
        torch.tensor([[768, 1024]]), torch.tensor([[0, 64]]), torch.tensor([[1024, 1024]])
    )
    assert ids.tolist() == [[768.0, 1024.0, 0.0, 64.0, 1024.0, 1024.0]]
