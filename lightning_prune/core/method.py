"""What a pruning method gives a :class:`~lightning_prune.core.session.PruningSession`: a
strategy object, not a callback. The methods themselves are in :mod:`lightning_prune.methods`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.gates import ChannelGate
from lightning_prune.core.graph import RESIDUAL_MODES, ChannelGroup

PruningSession = Any  # lightning_prune.core.session.PruningSession (which imports this module)

__all__ = ["Method"]


class Method:
    """A pruning method as a strategy: the session calls

    - :meth:`make_gate` once per channel group when it attaches the gates;
    - :meth:`make_optimizer` for the gates' parameters (``None``: nothing is learned);
    - :meth:`start` once the gates exist, :meth:`stop` before they are removed;
    - :meth:`regularizer` at every gate step (a scalar whose gradient is added to the gates');
    - :meth:`keep_masks` to choose the channels under the budget, :meth:`scores` to rank
      channels within a group when the widths are given;
    - :meth:`state_dict` / :meth:`load_state_dict` for plain state in checkpoints.

    ``last`` holds the values of the last regulariser call, for logging. ``residual`` is the
    residual mode the session builds the channel graph with unless told otherwise
    (``"tied"`` or ``"mixed"``, see :func:`lightning_prune.core.trace.build_graph`).
    """

    name = "method"
    residual = "tied"

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    @staticmethod
    def check_residual(residual: str) -> str:
        """``residual`` checked: ``"tied"`` or ``"mixed"``."""
        if residual not in RESIDUAL_MODES:
            raise ValueError(f"residual must be one of {', '.join(map(repr, RESIDUAL_MODES))}, got {residual!r}")
        return residual

    def make_gate(self, group: ChannelGroup) -> ChannelGate:
        raise NotImplementedError(f"{type(self).__name__} must say how its gates are made (make_gate)")

    def make_optimizer(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer | None:
        return None

    def start(self, session: PruningSession) -> None:
        """Called once the gates are attached."""

    def stop(self, session: PruningSession) -> None:
        """Called before the gates are removed (hard pruning)."""

    def regularizer(self, session: PruningSession) -> Tensor | None:
        return None

    def scores(self, session: PruningSession) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must rank channels (scores)")

    def keep_masks(self, session: PruningSession) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must choose keep-masks (keep_masks)")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
