"""Build a pipeline from plain config dicts: random weights, no files, no network.

`model_index.json` says which parts a family's pipeline has and of which class; each part is
built from its own config dict. Full-size builds (`families.build_pipeline_from_config`) and tiny
test models (`tiny.build_tiny_pipeline`) both come through here, so they cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import diffusers
import torch
import transformers

from sdtune.models.families import Family
from sdtune.models.tokenizer import load_tokenizer

# Config files of the parts that have one, relative to a family's config folder.
CONFIG_FILES = {
    "model_index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "low_res_scheduler": "low_res_scheduler/scheduler_config.json",
    "depth_estimator": "depth_estimator/config.json",
    "feature_extractor": "feature_extractor/preprocessor_config.json",
}
# A fixed order gives every part its own seed, whatever the order of model_index.json.
_SEED_ORDER = ("unet", "vae", "text_encoder", "depth_estimator", "text_encoder_2")


def load_family_configs(family: Family) -> dict[str, dict[str, Any]]:
    """The shipped config dicts of `family`, keyed by part name."""
    configs = {}
    for name, rel in CONFIG_FILES.items():
        path = family.config_dir / rel
        if path.exists():
            configs[name] = json.loads(path.read_text(encoding="utf-8"))
    return configs


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global RNG for one build without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_model(library: str, class_name: str, config: dict[str, Any]) -> Any:
    if library == "diffusers":
        return getattr(diffusers, class_name).from_config(config)
    model_cls = getattr(transformers, class_name)
    return model_cls(model_cls.config_class.from_dict(config))


def _build_part(
    name: str, library: str, class_name: str, config: dict[str, Any] | None, family: Family
) -> Any:
    """One pipeline part (model, scheduler, tokenizer or image processor) from its config."""
    if name in family.tokenizers:
        return load_tokenizer(family.tokenizer_pads[family.tokenizers.index(name)])
    if config is None:
        raise ValueError(f"no config for pipeline part '{name}' of family {family.name}")
    if library == "diffusers" and "Scheduler" in class_name:
        return getattr(diffusers, class_name).from_config(config)
    if library == "transformers" and class_name.endswith(("ImageProcessor", "FeatureExtractor")):
        settings = {k: v for k, v in config.items() if k != "image_processor_type"}
        return getattr(transformers, class_name)(**settings)
    return _build_model(library, class_name, config)


def build_pipeline(
    family: Family,
    configs: dict[str, dict[str, Any]],
    *,
    components: dict[str, Any] | None = None,
    empty: bool = False,
    seed: int = 0,
) -> Any:
    """The pipeline of `family` with every part built from `configs` (random weights).

    Each model part is initialised under its own seed derived from `seed`, so the same seed
    gives the same weights in any process. `empty=True` puts weights on the meta device.
    """
    components = dict(components or {})
    kwargs: dict[str, Any] = {}
    for name, value in configs["model_index"].items():
        if name.startswith("_"):
            continue
        if name in components:
            kwargs[name] = components.pop(name)
        elif not isinstance(value, list):
            kwargs[name] = value  # a plain pipeline setting, e.g. max_noise_level
        elif value[0] is None:
            kwargs[name] = None
        else:
            kwargs[name] = _build_seeded(name, value, configs.get(name), family, empty, seed)
    if components:
        unknown = ", ".join(sorted(components))
        raise ValueError(f"{family.pipeline_class} has no part named {unknown}")
    return getattr(diffusers, family.pipeline_class)(**kwargs)


def _build_seeded(
    name: str,
    spec: list[str],
    config: dict[str, Any] | None,
    family: Family,
    empty: bool,
    seed: int,
) -> Any:
    library, class_name = spec
    if empty:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return _build_part(name, library, class_name, config, family)
    offset = _SEED_ORDER.index(name) if name in _SEED_ORDER else len(_SEED_ORDER)
    with _seeded(seed * 100 + offset):
        part = _build_part(name, library, class_name, config, family)
    if isinstance(part, torch.nn.Module):
        part.eval()
    return part
