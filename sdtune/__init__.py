"""sdtune: LoRA fine-tuning for Stable Diffusion 1.x, 2.x and SDXL."""

__version__ = "0.1.0"
