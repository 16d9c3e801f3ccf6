"""Adapters on a base pipeline, live or fused (every mode's pipeline shares them)."""

from __future__ import annotations


def load_adapters(pipe, adapters: list[tuple[str, float]], fuse: bool = False) -> None:
    """Attach each (file, weight) adapter live; with `fuse`, bake them into the base weights."""
    from sdtune.adapters.load import attach_adapter

    names = []
    for index, (path, _weight) in enumerate(adapters):
        # Any layout (sdtune/diffusers, PEFT, kohya/A1111), checked against the model first.
        name = f"adapter_{index}"
        attach_adapter(pipe, path, name)
        names.append(name)
    if names:
        pipe.set_adapters(names, [weight for _, weight in adapters])
        if fuse:
            pipe.fuse_lora(adapter_names=names)
