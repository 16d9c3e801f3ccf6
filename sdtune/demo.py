"""The built-in demo: the whole flow, offline, in under a minute on a CPU.

It uses a tiny *randomly initialised* Stable Diffusion 1 model (not a pretrained one, so the
images are abstract) and eight rendered images of stars, captioned with the trigger word
`sks`. It shows the pipeline working end to end - data, LoRA training, saving, reloading,
generating - not image quality.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import load_config
from sdtune.data.synthetic import write_shape_dataset
from sdtune.errors import SdtuneError

DEMO_PROMPT = "a red sks star on a white background"


def free_folder(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the demo never writes into an earlier demo's folder."""
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not candidate.exists():
            return candidate
    raise SdtuneError(f"no free folder name next to '{base}'")


def run_demo(out: str | Path = "outputs/demo", max_steps: int = 200) -> str:
    from sdtune.generate.run import generate_to_folder
    from sdtune.models.tiny import build_tiny_pipeline
    from sdtune.train.loop import train

    out = free_folder(Path(out))
    base_dir, data_dir = out / "base-model", out / "images"
    build_tiny_pipeline("sd1", seed=0).save_pretrained(base_dir)
    write_shape_dataset(data_dir, shape="star", count=8, size=64, trigger="sks", seed=0)
    cfg = load_config(
        None,
        {
            "model.path": str(base_dir),
            "data.dir": str(data_dir),
            "data.trigger": "sks",
            "data.resolution": 64,
            "lora.rank": 8,
            "lora.alpha": 8,
            "lora.train_text_encoder": True,
            "train.max_steps": max_steps,
            "train.batch_size": 4,
            "train.learning_rate": 1e-3,
            "train.log_every_n_steps": 20,
            "output.dir": str(out / "lora"),
        },
    )
    result = train(cfg)
    before = generate_to_folder(
        DEMO_PROMPT, out / "samples-before", model=str(base_dir), num_images=4, steps=20, seed=0
    )
    after = generate_to_folder(
        DEMO_PROMPT,
        out / "samples-after",
        adapters=[(str(result.adapter_path), 1.0)],
        num_images=4,
        steps=20,
        seed=0,
    )
    return "\n".join(
        [
            f"demo folder:     {out}",
            f"training images: {data_dir}",
            f"adapter:         {result.adapter_path} ({result.steps} steps, last loss {result.last_loss:.4f})",
            f"before (base):   {before[-1]}",
            f"after (LoRA):    {after[-1]}",
            f"TensorBoard:     tensorboard --logdir {result.output_dir}",
        ]
    )
