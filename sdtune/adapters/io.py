"""Saving and loading adapters as diffusers-loadable safetensors with sdtune metadata.

The file is the one `StableDiffusionPipeline.load_lora_weights` (and, with SDXL's second text
encoder under `text_encoder_2.text_model.`, `StableDiffusionXLPipeline.load_lora_weights`) and
peft read unchanged: peft's key names under `unet.` and `text_encoder.text_model.` (see
`sdtune.adapters.layout`). Its
header carries diffusers' adapter metadata (so rank *and* alpha survive a reload, in the fields
every supported peft accepts) plus sdtune's own keys: family, base model, rank, alpha, targets,
trigger word, resolution and the resolved training config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdtune import __version__
from sdtune.adapters import layout
from sdtune.errors import SdtuneError

ADAPTER_FILE_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # what peft's save_pretrained writes
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
METADATA_PREFIX = "sdtune."


def save_adapter(
    folder: str | Path,
    unet,
    text_encoder=None,
    info: dict[str, object] | None = None,
    file_name: str = ADAPTER_FILE_NAME,
    text_encoder_2=None,
) -> Path:
    """Write the adapter of `unet` (and `text_encoder`, and SDXL's `text_encoder_2`) to
    `folder/file_name`, atomically. A part without LoRA layers is left out."""
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, per_part = {}, {}
    parts = (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))
    for part, model in parts:
        if model is None or "default" not in (getattr(model, "peft_config", None) or {}):
            continue
        peft_state = get_peft_model_state_dict(model)
        state.update(layout.peft_state_to_file(part, peft_state))
        per_part[part] = layout.peft_model_metadata(model, peft_state)
    header = {"format": "pt", DIFFUSERS_METADATA_KEY: layout.metadata_header(per_part)}
    header[METADATA_PREFIX + "version"] = __version__
    for key, value in (info or {}).items():
        header[METADATA_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
    path = folder / file_name
    _write_then_rename(state, path, header)
    return path


def _write_then_rename(state: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    """Write `path.tmp`, then rename it to `path`; a failed write (disk full, no permission)
    removes the partial file, leaves any earlier `path` as it was, and is a one-line error.
    A NaN or infinite value is never written: such a file is refused before anything is."""
    check_finite(state, path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=header)
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SdtuneError(
            f"cannot write '{path}': {reason}; free space or fix permissions"
        ) from None


def check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse to write `path` if any floating-point tensor holds a NaN or an infinity."""
    bad = {
        key: int((~torch.isfinite(t)).sum())
        for key, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    }
    if bad:
        key, count = next(iter(bad.items()))
        total = sum(t.numel() for t in tensors.values())
        raise SdtuneError(
            f"not writing '{path}': {sum(bad.values()):,} of {total:,} values are NaN or "
            f"infinite ({count:,} in {key}, {len(bad)} tensor(s) in all); the weights diverged"
        )


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """sdtune's header keys of an adapter file (without the prefix); empty for foreign files."""
    path = resolve_adapter_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for torn files
        raise SdtuneError(f"'{path}' is not a readable safetensors file: {exc}") from None
    n = len(METADATA_PREFIX)
    return {k[n:]: v for k, v in header.items() if k.startswith(METADATA_PREFIX)}


def resolve_adapter_path(path: str | Path) -> Path:
    """An adapter file, or the adapter file inside a run folder or a PEFT folder."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (ADAPTER_FILE_NAME, PEFT_WEIGHTS_NAME) if (path / n).is_file()]
        if not found:
            raise SdtuneError(f"folder '{path}' has no {ADAPTER_FILE_NAME} or {PEFT_WEIGHTS_NAME}")
        path = found[0]
    if not path.is_file():
        raise SdtuneError(f"adapter '{path}' does not exist")
    return path


def check_writable(path: str | Path, overwrite: bool = False) -> Path:
    """`path`, unless a file is already there and `overwrite` was not asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SdtuneError(
            f"'{path}' already exists; pass --overwrite (overwrite=True) to replace it"
        )
    return path


def write_safetensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    overwrite: bool = False,
) -> Path:
    """Write `tensors` to `path` through a temporary name, never replacing a file unasked."""
    path = check_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **metadata}
    _write_then_rename({k: v.contiguous() for k, v in tensors.items()}, path, header)
    return path


def read_diffusers_metadata(header: dict[str, str], path: str | Path) -> dict:
    """diffusers' adapter metadata (`lora_adapter_metadata`) as a dict; {} when absent.

    A header someone edited by hand can hold anything, so a value that is not a JSON object
    of fields is a one-line error naming the file instead of a JSON traceback.
    """
    raw = header.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        meta = exc
    if not isinstance(meta, dict):
        raise SdtuneError(
            f"'{path}': header key {DIFFUSERS_METADATA_KEY} is not a JSON object of adapter "
            "settings; remove the key or re-save the adapter"
        )
    for key, value in meta.items():
        if key.endswith(".alpha_pattern") and isinstance(value, dict):
            alphas = list(value.values())
        elif key.endswith((".lora_alpha", ".alpha_pattern")) and value is not None:
            alphas = [value]
        else:
            continue
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas):
            shown = repr(value)[:80]
            raise SdtuneError(
                f"'{path}': header {DIFFUSERS_METADATA_KEY} {key} is {shown}, not numbers"
            )
    return meta
