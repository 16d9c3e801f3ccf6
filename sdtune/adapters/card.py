"""The model card (`README.md`) written beside an adapter, in the Hugging Face format.

Its YAML header is what the Hub reads (base model, tags, trigger word), so a run folder can be
uploaded as it is; its body says how the adapter was trained and how to load it.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sdtune.errors import SdtuneError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_model_card(info: dict, samples: list[Path] | None = None, title: str = "") -> str:
    """Markdown text of the card for an adapter described by `info` (its header fields)."""
    base = str(info.get("base_model", ""))
    trigger = str(info.get("trigger", ""))
    header: dict = {
        "library_name": "diffusers",
        "tags": ["stable-diffusion", "text-to-image", "diffusers", "lora", "sdtune"],
    }
    if _HUB_ID.match(base) and not Path(base).exists():
        header["base_model"] = base  # the Hub links only real hub ids
    if trigger:
        header["instance_prompt"] = trigger
    name = title or "LoRA adapter"
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [
        f"A LoRA adapter for the **{info.get('family', '?')}** Stable Diffusion family "
        f"(`{info.get('prediction_type', '?')}` objective), trained with sdtune on `{base}`.",
        "",
    ]
    if trigger:
        lines += ["## Trigger word", "", f"Use `{trigger}` in the prompt.", ""]
    if samples:
        lines += ["## Samples", ""] + [f"![sample]({p.as_posix()})" for p in samples] + [""]
    lines += [
        "## Use it",
        "",
        "diffusers:",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base}")',
        'pipe.load_lora_weights(".", weight_name="pytorch_lora_weights.safetensors")',
        f'image = pipe("{("a photo of " + trigger) if trigger else "a photo"}").images[0]',
        "```",
        "",
        'sdtune: `sdtune generate --lora <this folder> --prompt "..."`.',
        "",
        "## Which file goes where",
        "",
        "| file | for |",
        "|---|---|",
        "| `pytorch_lora_weights.safetensors` | diffusers (`load_lora_weights`), peft, sdtune |",
    ]
    kohya = info.get("kohya_file")
    if kohya:
        lines.append(f"| `{kohya}` | AUTOMATIC1111, Forge, ComfyUI (kohya layout); sdtune |")
    lines += [
        "",
        "AUTOMATIC1111 and ComfyUI do not read the diffusers file whole (ComfyUI skips its "
        "attention layers and its header alpha), so give them the kohya file"
        + (
            "."
            if kohya
            else ": make it with `sdtune convert pytorch_lora_weights.safetensors --to kohya "
            "--out <name>.safetensors`."
        )
        + " `sdtune check FILE` says how many modules each of them loads.",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("rank", "alpha", "unet_targets", "text_encoder", "resolution", "steps"):
        if key in info:
            lines.append(f"| {key} | `{info[key]}` |")
    lines += ["", "The full resolved config is in `config.yaml` and in the file's header.", ""]
    return "\n".join(lines)


def write_model_card(
    folder: Path, info: dict, samples: list[Path] | None = None, title: str | None = None
) -> Path:
    """Write `folder/README.md` (temporary name, then rename), titled `title` or the folder's
    name."""
    path = folder / "README.md"
    tmp = folder / "README.md.tmp"
    try:
        tmp.write_text(
            build_model_card(info, samples, title=title or folder.name), encoding="utf-8"
        )
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SdtuneError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path
