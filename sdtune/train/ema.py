"""An exponential moving average of the adapter weights.

A LoRA's last step is one noisy draw; the EMA (shadow = decay * shadow + (1 - decay) * weight
after each step) is often the better adapter. Only the trainable tensors are averaged, so it
costs one extra copy of the adapter, not of the model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [t.cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.shadow, state["shadow"], strict=True):
            mine.copy_(saved)

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Put the averaged weights in the model for the duration (to save or sample them)."""
        backup = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(self.params, backup, strict=True):
                p.copy_(b)
