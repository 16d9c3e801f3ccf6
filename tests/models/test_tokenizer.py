from sdtune.models.tokenizer import load_tokenizer, write_tokenizer_folder


def test_real_clip_vocabulary_and_ids():
    tok = load_tokenizer(1)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


def test_sd1_pads_with_end_token_and_sd2_with_exclamation_mark():
    sd1 = load_tokenizer(1)("a", padding="max_length", max_length=6).input_ids
    sd2 = load_tokenizer(2)("a", padding="max_length", max_length=6).input_ids
    assert sd1 == [49406, 320, 49407, 49407, 49407, 49407]
    assert sd2 == [49406, 320, 49407, 0, 0, 0]


def test_written_tokenizer_folder_loads_with_from_pretrained(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_tokenizer_folder(tmp_path / "tokenizer", sd_version=2)
    tok = CLIPTokenizer.from_pretrained(folder)
    assert len(tok) == 49408
    assert tok.pad_token == "!" and tok.pad_token_id == 0
