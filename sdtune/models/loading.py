"""Load a base model from a local diffusers folder, a single-file checkpoint, or a hub id.

Whatever the source, the result is the diffusers pipeline of the model's family (txt2img,
inpainting, depth-to-image, x4 upscaling, SDXL and its inpainting and refiner), without a
safety checker. Single files in the
original layout are converted by diffusers with the configs sdtune ships, so nothing is fetched;
pickled checkpoints are only read with `weights_only=True`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sdtune.errors import SdtuneError, first_line
from sdtune.models import ldm_keys
from sdtune.models.families import (
    Family,
    detect_family_from_folder,
    get_family,
    write_config_folder,
)
from sdtune.models.original_layout import (
    CHECKPOINT_SUFFIXES,
    CheckpointInfo,
    declares_zero_terminal_snr,
    detect_family_from_checkpoint,
    load_original_state_dict,
    read_checkpoint_info,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# The parts of an SD 2 depth checkpoint that load through the SD txt2img single-file loader.
_TXT2IMG_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pipeline(
    source: str | os.PathLike,
    family: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | None = None,
    *,
    config_dir: str | os.PathLike | None = None,
    components: dict[str, Any] | None = None,
) -> Any:
    """The pipeline of the model at `source`: a diffusers folder, a checkpoint file or a hub id.

    `family` overrides detection (e.g. "sd2-v" for a 768-v single file with no telling name).
    `config_dir` points a single-file load at a diffusers config folder instead of the shipped
    configs (for models whose architecture differs, such as tiny test models). `components`
    passes ready-made parts by name, e.g. `{"depth_estimator": ...}` for a depth checkpoint.
    """
    fam = get_family(family) if family is not None else None
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        pipe = _load_folder(path, fam, torch_dtype, components)
    elif path.is_file():
        config = Path(config_dir) if config_dir is not None else None
        pipe = _load_single_file(path, fam, torch_dtype, config, components)
    elif _HUB_ID.match(text) and not text.lower().endswith(CHECKPOINT_SUFFIXES):
        pipe = _load_folder(_download(text), fam, torch_dtype, components)
    else:
        raise SdtuneError(
            f"model '{text}' not found: no such file or folder; expected a diffusers folder, "
            "a .safetensors/.ckpt checkpoint, or a hub id such as org/name"
        )
    if fam is not None:
        _match_prediction_type(pipe, fam)
    if device is not None:
        pipe.to(device)
    return pipe


def _pipeline_class(family: Family) -> Any:
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _without_safety_checker(cls: Any, components: dict[str, Any] | None) -> dict[str, Any]:
    """Loading kwargs that skip the safety checker (sdtune never uses it) unless one is given."""
    kwargs = dict(components or {})
    params = inspect.signature(cls.__init__).parameters
    if "safety_checker" in params:
        kwargs.setdefault("safety_checker", None)
    if "requires_safety_checker" in params:
        kwargs.setdefault("requires_safety_checker", False)
    return kwargs


def _resolve_family(given: Family | None, detected: Family, source: Path | str) -> Family:
    """The user's family if it fits the weights: the same model line (SD 1, SD 2, SDXL), text
    encoders and U-Net inputs. Only the prediction type may differ (sd2-base vs sd2-v)."""
    if given is None:
        return detected
    same_shape = (given.line, given.text_encoders, given.extra_inputs) == (
        detected.line,
        detected.text_encoders,
        detected.extra_inputs,
    )
    if not same_shape:
        raise SdtuneError(
            f"{source}: family '{given.name}' does not fit this model, which looks like "
            f"'{detected.name}'; pass family='{detected.name}' or leave family unset "
            f"('{given.name}': {given.description}; '{detected.name}': {detected.description})"
        )
    return given


def _match_prediction_type(pipe: Any, family: Family) -> None:
    """Make the scheduler predict what the caller's family says (sd2-base/sd2-v look alike)."""
    scheduler = pipe.scheduler
    if scheduler.config.get("prediction_type") != family.prediction_type:
        pipe.scheduler = type(scheduler).from_config(
            scheduler.config, prediction_type=family.prediction_type
        )


# Image-processor classes named in published model indexes that transformers 5 removed.
_REMOVED_PROCESSORS = {
    "CLIPFeatureExtractor": "CLIPImageProcessor",  # SD 1.5
    "DPTFeatureExtractor": "DPTImageProcessor",  # SD 2 depth
}


def _register_processor_renames() -> None:
    """Teach diffusers' folder loader the renames it lacks (it knows only the CLIP one).

    diffusers keeps a table of transformers classes that were renamed; stabilityai's depth
    model names `DPTFeatureExtractor`, which is not in it, and the load fails.
    """
    try:
        from diffusers.utils import deprecation_utils

        table = deprecation_utils._TRANSFORMERS_CLASS_REMAPPING
    except (ImportError, AttributeError):  # a diffusers without the table: nothing to teach
        return
    for old, new in _REMOVED_PROCESSORS.items():
        table.setdefault(old, {"new_class": new, "transformers_version": (">", "4.57.0")})


def _legacy_processors(folder: Path, components: dict[str, Any]) -> dict[str, Any]:
    """Image processors a config folder names by a removed class, loaded with the new class.

    diffusers' single-file loader looks classes up without its rename table, so they are
    loaded here and passed in ready-made. The settings file is the same for both classes.
    """
    import transformers

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    found = {}
    for name, spec in index.items():
        if name in components or not isinstance(spec, list) or spec[0] != "transformers":
            continue
        new = _REMOVED_PROCESSORS.get(spec[1])
        if new is not None and (folder / name).is_dir():
            found[name] = getattr(transformers, new).from_pretrained(str(folder / name))
    return found


def _load_folder(
    folder: Path, fam: Family | None, dtype: torch.dtype | None, components: dict | None
) -> Any:
    if not (folder / "model_index.json").is_file():
        raise SdtuneError(
            f"{folder} has no model_index.json, so it is not a diffusers model folder; "
            "pass the folder that contains model_index.json, or a .safetensors file"
        )
    family = _resolve_family(fam, detect_family_from_folder(folder), folder)
    cls = _pipeline_class(family)
    kwargs = _without_safety_checker(cls, components)
    _register_processor_renames()
    try:
        return cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:  # missing or mismatched weight files
        raise SdtuneError(f"{folder}: cannot load as '{family.name}' ({first_line(exc)})") from exc


def _download(repo_id: str) -> Path:
    """The local snapshot of hub model `repo_id`: from the cache, or fetched when online."""
    from diffusers import DiffusionPipeline

    try:
        # safety_checker=None: sdtune never runs it, so its 1.2 GB are not downloaded.
        return Path(DiffusionPipeline.download(repo_id, safety_checker=None))
    except (OSError, ValueError) as exc:  # huggingface_hub's errors derive from these
        reason = first_line(exc)
        raise SdtuneError(
            f"cannot fetch '{repo_id}': it is not a local path, not in the Hugging Face cache, "
            f"and the Hub cannot be reached; download it with `hf download {repo_id}` "
            f"(or `huggingface-cli download {repo_id}`) on a machine with network, or pass a local "
            f"folder / .safetensors file [hub: {reason}]"
        ) from None


def _single_file_family(
    info: CheckpointInfo, fam: Family | None, config_dir: Path | None
) -> Family:
    """The family to load a checkpoint as: the caller's (fit-checked), or detected."""
    if fam is None and config_dir is not None:
        fam = detect_family_from_folder(config_dir)  # its scheduler settles eps vs v
    if fam is None:
        return detect_family_from_checkpoint(info)
    with warnings.catch_warnings():  # the eps/v guess is moot: the caller has settled it
        warnings.simplefilter("ignore")
        detected = detect_family_from_checkpoint(info)
    return _resolve_family(fam, detected, info.path)


def _load_single_file(
    path: Path,
    fam: Family | None,
    dtype: torch.dtype | None,
    config_dir: Path | None,
    components: dict | None,
) -> Any:
    info = read_checkpoint_info(path)  # keys, shapes and header; read once
    family = _single_file_family(info, fam, config_dir)
    if config_dir is not None and not (config_dir / "model_index.json").is_file():
        raise SdtuneError(f"config_dir {config_dir} has no model_index.json")
    components = dict(components or {})
    if config_dir is not None:
        components.update(_legacy_processors(config_dir, components))
    with tempfile.TemporaryDirectory(prefix="sdtune-config-") as tmp:
        config = config_dir or write_config_folder(family, Path(tmp) / "config")
        try:
            if family.name == "sd2-depth":
                pipe = _load_depth_single_file(path, config, Path(tmp), dtype, components)
            else:
                if _xl_encoders_look_alike(family, config, components):
                    components["text_encoder_2"] = _load_xl_open_clip(path, config, dtype)
                cls = _pipeline_class(family)
                kwargs = _without_safety_checker(cls, components)
                pipe = cls.from_single_file(
                    str(path),
                    config=str(config),
                    torch_dtype=dtype,
                    local_files_only=True,
                    **kwargs,
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise SdtuneError(
                f"{path}: cannot load as '{family.name}' ({first_line(exc)}); if the family is "
                "wrong, give the right one (model.family / --family); a non-standard "
                "architecture loads with its diffusers config folder (model.config_dir / "
                "--config-dir)"
            ) from exc
    _match_prediction_type(pipe, family)  # a v-prediction SDXL file, with SDXL's eps configs
    if declares_zero_terminal_snr(info):
        _use_zero_terminal_snr_schedule(pipe)
    return pipe


def _use_zero_terminal_snr_schedule(pipe: Any) -> None:
    """The noise schedule a zero-terminal-SNR model was trained on: betas rescaled to SNR 0 at
    the last step, timesteps spaced from it ("trailing"), as ComfyUI samples such a file."""
    import inspect

    scheduler = pipe.scheduler
    if "rescale_betas_zero_snr" in inspect.signature(type(scheduler).__init__).parameters:
        pipe.scheduler = type(scheduler).from_config(
            scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
        )


def _xl_encoders_look_alike(family: Family, config: Path, components: dict) -> bool:
    """Whether SDXL's two text encoders have one width, as in tiny test models.

    diffusers' single-file loader tells CLIP ViT-L from OpenCLIP bigG by width alone (768 vs
    1280); with equal widths it silently gives `text_encoder_2` the ViT-L weights.
    """
    if family.text_encoders != ("text_encoder", "text_encoder_2"):
        return False
    if "text_encoder_2" in components:
        return False
    widths = set()
    for part in family.text_encoders:
        file = config / part / "config.json"
        widths.add(json.loads(file.read_text(encoding="utf-8")).get("hidden_size"))
    return len(widths) == 1


def _load_xl_open_clip(path: Path, config: Path, dtype: torch.dtype | None) -> Any:
    """SDXL's `text_encoder_2` (OpenCLIP bigG, embedder 1) from a checkpoint, with diffusers'
    own OpenCLIP key conversion."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prefix = ldm_keys.XL_OPENCLIP_PREFIX
    state = {k: v for k, v in load_original_state_dict(path).items() if k.startswith(prefix)}
    model = CLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(str(config / "text_encoder_2"), local_files_only=True)
    )
    model.load_state_dict(convert_open_clip_checkpoint(model, state, prefix=prefix))
    return model.to(dtype).eval() if dtype is not None else model.eval()


def _txt2img_config_folder(config: Path, dest: Path) -> Path:
    """A copy of `config`'s txt2img parts (configs only) with a StableDiffusionPipeline index."""
    for part in _TXT2IMG_PARTS:
        for file in (config / part).glob("*"):
            if file.is_file() and file.suffix in (".json", ".txt"):
                (dest / part).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, dest / part / file.name)
    index = json.loads((config / "model_index.json").read_text(encoding="utf-8"))
    txt2img = {name: index[name] for name in _TXT2IMG_PARTS}
    txt2img.update(
        _class_name="StableDiffusionPipeline",
        safety_checker=[None, None],
        feature_extractor=[None, None],
        requires_safety_checker=False,
    )
    (dest / "model_index.json").write_text(json.dumps(txt2img, indent=2), encoding="utf-8")
    return dest


def _load_depth_single_file(
    path: Path, config: Path, tmp: Path, dtype: torch.dtype | None, components: dict
) -> Any:
    """Depth-to-image from a single file: diffusers has no single-file loader for it.

    The U-Net, VAE and text encoder come from the checkpoint through the txt2img loader; the
    DPT depth estimator is not part of original depth checkpoints and must come from elsewhere.
    """
    from diffusers import StableDiffusionDepth2ImgPipeline, StableDiffusionPipeline
    from transformers import AutoImageProcessor, DPTForDepthEstimation

    estimator = components.pop("depth_estimator", None)
    estimator_dir = config / "depth_estimator"
    if estimator is None and any(estimator_dir.glob("*.safetensors")):
        estimator = DPTForDepthEstimation.from_pretrained(str(estimator_dir), dtype=dtype)
    if estimator is None:
        raise SdtuneError(
            f"{path}: original depth checkpoints do not contain the DPT depth estimator; pass "
            "components={'depth_estimator': DPTForDepthEstimation.from_pretrained(...)} or "
            "config_dir=<a diffusers sd2-depth folder with depth_estimator weights>"
        )
    processor = components.pop("feature_extractor", None) or AutoImageProcessor.from_pretrained(
        str(config / "feature_extractor")
    )
    base = StableDiffusionPipeline.from_single_file(
        str(path),
        config=str(_txt2img_config_folder(config, tmp / "txt2img")),
        torch_dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        **{k: v for k, v in components.items() if k in _TXT2IMG_PARTS},
    )
    parts = {name: getattr(base, name) for name in _TXT2IMG_PARTS}
    return StableDiffusionDepth2ImgPipeline(
        **parts, depth_estimator=estimator, feature_extractor=processor
    )
