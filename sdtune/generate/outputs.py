"""Writing generated images: PNGs with their parameters inside, never over an existing file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def quote_infotext(value: str) -> str:
    """A value of the `key: value, ...` line as AUTOMATIC1111 writes it: as is, or, when it holds
    a comma, colon or newline (which would end or split the field), as a JSON string."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


@dataclass
class GenerationParams:
    """What made an image, for its PNG text chunk. A field left None or empty is not written
    (a VAE decode has no steps or seed)."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str = ""
    model: str = ""
    adapters: list[tuple[str, float]] = field(default_factory=list)
    mode: str = "txt2img"
    schedule_type: str = ""  # A1111 "Schedule type", e.g. Karras
    denoising_strength: float | None = None  # img2img, inpaint, depth2img
    mask: str = ""  # inpaint: the mask file's name
    noise_level: int | None = None  # x4 upscaler
    dtype: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # further fields, written in order

    def fields(self) -> dict[str, str]:
        """The `key: value` fields in the order they are written (values unquoted)."""
        size = f"{self.width}x{self.height}" if self.width and self.height else None
        values: dict[str, object] = {
            "Steps": self.steps,
            "Sampler": self.scheduler,
            "Schedule type": self.schedule_type,
            "CFG scale": None if self.guidance_scale is None else f"{self.guidance_scale:g}",
            "Seed": self.seed,
            "Size": size,
            "Model": self.model,
            **self._mode_fields(),
            "Lora": "; ".join(f"{Path(p).name}:{w:g}" for p, w in self.adapters),
            **self.extra,
            "Generator": "sdtune",
        }
        return {k: str(v) for k, v in values.items() if v is not None and v != ""}

    def to_a1111_text(self) -> str:
        """The `parameters` text chunk that AUTOMATIC1111 and civitai read back: the prompt,
        `Negative prompt: ...`, and one last line of `key: value` fields."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {quote_infotext(v)}" for k, v in self.fields().items()))
        return "\n".join(lines)

    def _mode_fields(self) -> dict[str, object]:
        """The fields A1111 writes for image-to-image, inpainting and upscaling runs."""
        strength = self.denoising_strength
        return {
            "Denoising strength": None if strength is None else f"{strength:g}",
            "Mask": self.mask,
            "Noise level": self.noise_level,
            "Mode": self.mode if self.mode != "txt2img" else None,
            "Precision": self.dtype,
        }


def save_png(image: Image.Image, folder: str | Path, params: GenerationParams, stem: str) -> Path:
    """Save as `<stem>.png`, or `<stem>-1.png`, ... if taken; the parameters go in the text chunk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", params.to_a1111_text())
    for n in range(10_000):
        path = folder / (f"{stem}.png" if n == 0 else f"{stem}-{n}.png")
        try:
            with open(path, "xb") as handle:  # exclusive create: an existing file is never touched
                image.save(handle, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free file name for '{stem}' in {folder}")


def save_grid(
    images: list[Image.Image],
    folder: str | Path,
    stem: str,
    params: GenerationParams,
    columns: int = 4,
) -> Path:
    """A contact sheet of same-sized images, saved beside them. Like A1111's grids it carries
    the first image's parameters (its prompt, seed and size), plus how the grid is laid out."""
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    layout = {"Grid": f"{columns}x{rows} of {len(images)}"}
    return save_png(grid, folder, replace(params, extra={**params.extra, **layout}), stem)
