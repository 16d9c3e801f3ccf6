"""Model families, their shipped configs, loading base models, and tiny models for tests.

Importing this package is cheap: the family table needs no torch. The loaders and builders,
which import torch/diffusers, are reached lazily through their names here.
"""

from __future__ import annotations

import importlib
from typing import Any

from sdtune.models.families import (
    FAMILIES,
    Family,
    build_pipeline_from_config,
    detect_family,
    detect_family_from_folder,
    get_family,
    write_config_folder,
)
from sdtune.models.tokenizer import load_tokenizer

_LAZY = {
    "build_tiny_pipeline": "sdtune.models.tiny",
    "TINY_RESOLUTION": "sdtune.models.tiny",
    "TINY_UPSCALER_INPUT": "sdtune.models.tiny",
    "load_pipeline": "sdtune.models.loading",
    "save_original_checkpoint": "sdtune.models.original_layout",
    "load_original_state_dict": "sdtune.models.original_layout",
    "detect_family_from_checkpoint": "sdtune.models.original_layout",
    "read_checkpoint_info": "sdtune.models.original_layout",
}

__all__ = [
    "FAMILIES",
    "Family",
    "build_pipeline_from_config",
    "detect_family",
    "detect_family_from_folder",
    "get_family",
    "load_tokenizer",
    "write_config_folder",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdtune.models' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)
