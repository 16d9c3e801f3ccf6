"""DreamBooth with prior preservation (Ruiz et al. 2023): each training item is one instance
image (the subject, captioned with the trigger) and one class image (the subject's class,
captioned with the class prompt). Training on both keeps the model's idea of the class while
it learns the subject, so "a dog" still draws dogs in general rather than only yours."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from sdtune.data.dataset import collate_sizes
from sdtune.data.transforms import SIZE_KEYS

# Class items draw their noise from seeds far from the instance items' seeds.
CLASS_DRAW_OFFSET = 1 << 40


class PriorPreservationDataset(Dataset):
    """Instance item `i` of epoch `e` paired with class item `i mod n_class` of the same epoch."""

    def __init__(self, instances: Dataset, classes: Dataset) -> None:
        self.instances = instances
        self.classes = classes

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """The instances' buckets: class images take the bucket of the instance they pair with."""
        return getattr(self.instances, "buckets", None)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(index, len(self.instances))
        item = dict(self.instances[index])
        # With buckets the class image is fitted (resized and cropped or padded, as the
        # instances are) to its instance's bucket, so the pair stacks into one batch tensor.
        size = self.instances.size_of(i) if self.buckets is not None else None
        paired = self.classes.get(epoch * len(self.classes) + i % len(self.classes), size)
        item["class_pixel_values"] = paired["pixel_values"]
        item["class_caption"] = paired["caption"]
        item["class_draw"] = CLASS_DRAW_OFFSET + paired["draw"]
        for key in SIZE_KEYS:
            item["class_" + key] = paired[key]
        return item


def collate_pairs(items: list[dict]) -> dict:
    """Instance items first, then their class items, with a mask marking the class half (the
    sizes, (batch, 2) tensors, in the same order)."""
    pixels = [i["pixel_values"] for i in items] + [i["class_pixel_values"] for i in items]
    instances, classes = collate_sizes(items), collate_sizes(items, "class_")
    return {
        "pixel_values": torch.stack(pixels),
        "captions": [i["caption"] for i in items] + [i["class_caption"] for i in items],
        "draws": [i["draw"] for i in items] + [i["class_draw"] for i in items],
        "prior": torch.tensor([False] * len(items) + [True] * len(items)),
        **{k: torch.cat([instances[k], classes[k]]) for k in instances.keys() & classes.keys()},
    }
