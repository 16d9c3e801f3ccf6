import sys

import pytest
import torch

from sdtune.errors import SdtuneError
from sdtune.train.optim import OPTIMIZERS, build_optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_descends_with_its_group_lr(name):
    torch.manual_seed(0)
    big = torch.nn.Parameter(
        torch.randn(128, 64)
    )  # >= 4096 elements: bitsandbytes keeps 8-bit state
    frozen_lr = torch.nn.Parameter(torch.randn(8))
    opt = build_optimizer(
        name, [{"params": [big], "lr": 1e-2}, {"params": [frozen_lr], "lr": 0.0}], 0.0
    )
    start, other = (big**2).sum().item(), frozen_lr.detach().clone()
    for _ in range(5):
        ((big**2).sum() + (frozen_lr**2).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert (big**2).sum().item() < start
    torch.testing.assert_close(frozen_lr.detach(), other)  # a group with lr 0 does not move
    if name.endswith("8bit"):
        assert opt.state[big]["state1"].dtype == torch.uint8


def test_missing_bitsandbytes_is_a_clear_error_not_a_silent_switch(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(SdtuneError, match="adamw8bit needs bitsandbytes.*train.optimizer=adamw"):
        build_optimizer("adamw8bit", [{"params": [p], "lr": 1e-3}], 0.0)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(SdtuneError, match="one of adamw, adamw8bit"):
        build_optimizer("adam", [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], 0.0)
