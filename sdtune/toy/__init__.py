"""The toy world: rendered shape scenes, a tiny Stable Diffusion pretrained on them, a measure.

Pretrained Stable Diffusion weights cannot be fetched everywhere sdtune is built and tested, and
a randomly initialised model cannot show whether fine-tuning learns. The toy world can: the
shipped base (`sdtune/toy/base`, a real diffusers SD 1 folder) draws circles, squares and
triangles in five colours; rings (and stars) are held out, for a LoRA to teach; `measure` tells
what an image shows, so learning is a number.
"""

from pathlib import Path

TOY_BASE_DIR = Path(__file__).parent / "base"
