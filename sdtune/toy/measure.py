"""What a toy-world image shows: a small CNN that tells the shape and the colour of the shape.

It is trained on rendered scenes (all five shapes, the held-out ring and star included) with
blur, noise and light colour jitter, half of them passed through the toy base's VAE, so it also
reads the softer images the toy model draws. The weights ship with the package
(`classifier.safetensors`, ~0.4 MB); `scripts/train_toy_base.py` makes them and `tests/toy`
checks their accuracy on freshly rendered scenes.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from sdtune.data.synthetic import Pose
from sdtune.errors import SdtuneError
from sdtune.toy.world import ALL_SHAPES, COLOUR_NAMES, render_scenes, sample_scenes

CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
# The classifier learns and is tested on shapes anywhere in the image at any turn, far wider
# than the toy world's poses, so it reads what a model draws off-centre or turned as well.
JUDGE_POSE = Pose()


class ShapeColourNet(nn.Module):
    """Five convolutions (four strided) with batch norm, global mean and max pooling, and one
    head each for shape and colour (~0.1 M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip((3, 16, 32, 64, 64), (16, 32, 64, 64, 64), strict=True)):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(b)]
            layers.append(nn.SiLU())
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(128, len(ALL_SHAPES))
        self.colour_head = nn.Linear(128, len(COLOUR_NAMES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(images)
        x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.shape_head(x), self.colour_head(x)


def to_tensor(images: np.ndarray | list) -> torch.Tensor:
    """uint8 (N, H, W, 3) arrays or PIL images -> float (N, 3, H, W) in [-1, 1]."""
    array = np.stack(
        [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
    )
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, colour jitter and noise of random strength: what generated images differ by."""
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    x = mix * blurred + (1 - mix) * x
    x = x + 0.06 * torch.randn(n, 3, 1, 1, generator=gen)
    x = x * (1 + 0.1 * torch.randn(n, 1, 1, 1, generator=gen))
    x = x + 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1)


def labels_of(scenes: list) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor([ALL_SHAPES.index(s.shape) for s in scenes])
    colours = torch.tensor([COLOUR_NAMES.index(s.colour) for s in scenes])
    return shapes, colours


@torch.no_grad()
def round_trip(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images encoded (a posterior sample) and decoded by `vae`: what its decoder makes of them."""
    out = []
    for i in range(0, len(images), 256):
        dist = vae.encode(images[i : i + 256]).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        out.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(out)


def train_classifier(
    steps: int = 600, batch_size: int = 64, seed: int = 0, vae=None, round_trips: int = 6000
) -> ShapeColourNet:
    """Train the classifier from scratch on a fixed set of rendered scenes (seeded).

    With `vae`, `round_trips` of the scenes are also passed through it and half of each batch
    comes from them: generated images are decoded by that VAE, whose output is softer than a
    render (rounded corners, blurred points), and the classifier must read those too.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes = sample_scenes(12000, ALL_SHAPES, rng)
    images = to_tensor(render_scenes(scenes, rng, pose=JUDGE_POSE))
    shapes, colours = labels_of(scenes)
    gen = torch.Generator().manual_seed(seed)
    soft = round_trip(vae, images[:round_trips], gen) if vae is not None else None
    net = ShapeColourNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(scenes), (batch_size,), generator=gen)
        x = images[idx]
        if soft is not None:
            half = torch.randint(0, round_trips, (batch_size // 2,), generator=gen)
            idx = torch.cat([idx[: batch_size - half.numel()], half])
            x = torch.cat([x[: batch_size - half.numel()], soft[half]])
        shape_logits, colour_logits = net(augment(x, gen))
        loss = F.cross_entropy(shape_logits, shapes[idx]) + F.cross_entropy(
            colour_logits, colours[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> ShapeColourNet:
    """The shipped classifier (or one saved at `path`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"toy classifier weights not found at {path}")
    net = ShapeColourNet()
    net.load_state_dict(load_file(path))
    return net.eval()


def save_classifier(net: ShapeColourNet, path: str | Path = CLASSIFIER_PATH) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


@torch.no_grad()
def classify(net: ShapeColourNet, images: np.ndarray | list) -> list[tuple[str, str]]:
    """(shape, colour) of each image: uint8 arrays or PIL images of any size (resized to 64)."""
    x = to_tensor(images)
    if x.shape[-1] != 64 or x.shape[-2] != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    shape_logits, colour_logits = net(x)
    return [
        (ALL_SHAPES[s], COLOUR_NAMES[c])
        for s, c in zip(
            shape_logits.argmax(1).tolist(), colour_logits.argmax(1).tolist(), strict=True
        )
    ]


def classifier_accuracy(
    net: ShapeColourNet, count: int = 2000, seed: int = 12345, vae=None
) -> dict:
    """Shape and colour accuracy on `count` freshly rendered scenes of all four shapes
    (with `vae`: on their round trips through it)."""
    rng = random.Random(seed)
    scenes = sample_scenes(count, ALL_SHAPES, rng)
    images = render_scenes(scenes, rng, pose=JUDGE_POSE)
    if vae is not None:
        soft = round_trip(vae, to_tensor(images), torch.Generator().manual_seed(seed))
        images = ((soft + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    predicted = classify(net, images)
    shape_ok = [p[0] == s.shape for p, s in zip(predicted, scenes, strict=True)]
    colour_ok = [p[1] == s.colour for p, s in zip(predicted, scenes, strict=True)]
    return {"shape": float(np.mean(shape_ok)), "colour": float(np.mean(colour_ok)), "count": count}
