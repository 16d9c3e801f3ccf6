"""Writing generated images: PNGs with their parameters inside, never over an existing file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    scheduler: str = ""
    model: str = ""
    adapters: list[tuple[str, float]] = field(default_factory=list)
    mode: str = "txt2img"
    schedule_type: str = ""  # A1111 "Schedule type", e.g. Karras
    denoising_strength: float | None = None  # img2img, inpaint, depth2img
    mask: str = ""  # inpaint: the mask file's name
    noise_level: int | None = None  # x4 upscaler
    dtype: str = ""

    def to_a1111_text(self) -> str:
        """The `parameters` text chunk that AUTOMATIC1111 and civitai read back."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.scheduler}",
            *([f"Schedule type: {self.schedule_type}"] if self.schedule_type else []),
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
        ]
        fields.extend(self._mode_fields())
        if self.adapters:
            fields.append("Lora: " + "; ".join(f"{Path(p).name}:{w:g}" for p, w in self.adapters))
        fields.append("Generator: sdtune")
        lines.append(", ".join(fields))
        return "\n".join(lines)

    def _mode_fields(self) -> list[str]:
        """The fields A1111 writes for image-to-image, inpainting and upscaling runs."""
        fields = []
        if self.denoising_strength is not None:
            fields.append(f"Denoising strength: {self.denoising_strength:g}")
        if self.mask:
            fields.append(f"Mask: {self.mask}")
        if self.noise_level is not None:
            fields.append(f"Noise level: {self.noise_level}")
        if self.mode != "txt2img":
            fields.append(f"Mode: {self.mode}")
        if self.dtype:
            fields.append(f"Precision: {self.dtype}")
        return fields


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


def save_grid(images: list[Image.Image], folder: str | Path, stem: str, columns: int = 4) -> Path:
    """A contact sheet of same-sized images, saved beside them."""
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return save_png(grid, folder, GenerationParams(prompt=stem), stem)
