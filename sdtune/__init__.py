"""sdtune: LoRA fine-tuning for Stable Diffusion 1.x and 2.x."""

__version__ = "0.1.0"
