"""The shipped ImageClassifier: its loss and its argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.classifier import ImageClassifier


def _module(**kwargs: object) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(nn.Linear(6, 3), 3, optimizer=torch.optim.SGD, **kwargs)


def test_label_smoothing_smooths_the_training_loss_only() -> None:
    module = _module(label_smoothing=0.2)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    logits = module(x)
    smoothed, plain = F.cross_entropy(logits, y, label_smoothing=0.2), F.cross_entropy(logits, y)
    assert not torch.isclose(smoothed, plain)
    # golden value of the smoothed targets: (1 - 0.2) on the label plus 0.2 / 3 on every class
    targets = torch.full((8, 3), 0.2 / 3).scatter_add(1, y[:, None], torch.full((8, 1), 0.8))
    assert torch.isclose(smoothed, -(targets * logits.log_softmax(1)).sum(1).mean())
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    assert torch.isclose(module.training_step((x, y), 0), smoothed)
    module.validation_step((x, y), 0)
    assert torch.isclose(logged["val/loss"], plain)
    assert torch.isclose(_module().training_step((x, y), 0), plain)


@pytest.mark.parametrize("value", [-0.1, 1.0, True, "0.1"])
def test_label_smoothing_outside_zero_to_one_is_an_error(value: object) -> None:
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        _module(label_smoothing=value)
