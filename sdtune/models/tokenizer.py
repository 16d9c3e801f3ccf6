"""The CLIP tokenizer shipped with sdtune, so no model family needs the network to tokenize.

One 49,408-token vocabulary serves every family (`configs/tokenizer/`, rebuilt by
`scripts/build_clip_tokenizer.py`). SD 1 pads prompts with `<|endoftext|>`; SD 2 (OpenCLIP) pads
with `!` (id 0). The padding token changes the text embeddings at padded positions, so it must
match what the text encoder was trained with; `configs/tokenizer_sd2/` holds only the two small
settings files that differ, and the vocabulary is not duplicated.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
TOKENIZER_DIR = CONFIGS_DIR / "tokenizer"
SD2_SETTINGS_DIR = CONFIGS_DIR / "tokenizer_sd2"
VOCAB_FILES = ("vocab.json", "merges.txt")
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json")
MODEL_MAX_LENGTH = 77
SD2_PAD_TOKEN = "!"


def _settings_dir(sd_version: int) -> Path:
    return SD2_SETTINGS_DIR if sd_version == 2 else TOKENIZER_DIR


def load_tokenizer(sd_version: int = 1) -> CLIPTokenizer:
    """The real CLIP tokenizer with the padding token of SD `sd_version` (1 or 2).

    Built with `from_pretrained` on a folder: in transformers 5 `CLIPTokenizer(vocab_file=...)`
    silently yields a 2-token vocabulary.
    """
    from transformers import CLIPTokenizer

    kwargs = {"pad_token": SD2_PAD_TOKEN} if sd_version == 2 else {}
    return CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=MODEL_MAX_LENGTH, **kwargs
    )


def write_tokenizer_folder(dest: Path, sd_version: int = 1) -> Path:
    """Write a tokenizer folder `from_pretrained` can read: shared vocabulary + version settings."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in VOCAB_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, dest / name)
    for name in SETTINGS_FILES:
        shutil.copyfile(_settings_dir(sd_version) / name, dest / name)
    return dest
