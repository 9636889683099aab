"""Per-channel gates: Hard Concrete gates, Dirichlet importance switches and fixed binary masks.

Pure tensor maths, no Lightning. A gate owns one multiplier per output channel of a channel
group; other modules (the channel graph's gate sites, ``gating``) decide where the multiplier
is applied.

Every gate follows the :class:`ChannelGate` protocol:

- ``gate()`` (``forward``) returns the per-channel multiplier, shape ``(num_channels,)``:
  a random sample in training mode, the deterministic value in eval mode;
- ``gate.open_probability()`` returns a differentiable value in [0, 1] per channel, the
  probability (or, for the Dirichlet switch, the relative importance; see there) that the
  channel is kept;
- ``gate.alive()`` returns the boolean channels that would be kept if pruned now;
- ``gate.to_fixed_mask()`` freezes that decision into a :class:`FixedMask`.

References: the Hard Concrete gate as described in the supplementary material of Lemaire,
Achkar and Jodoin, "Structured Pruning of Neural Networks with Budget-Aware Regularization"
(CVPR 2019, arXiv:1811.09332), Sec. 9, eqs. 4-5; the Dirichlet switches of Adamczewski and Park,
"Dirichlet Pruning for Neural Network Compression" (AISTATS 2021, arXiv:2011.05985).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_prune._checks import check_int
from lightning_prune.core.budget import finite_real

__all__ = [
    "ChannelGate",
    "DirichletSwitch",
    "FixedMask",
    "HardConcreteGate",
    "dirichlet_kl",
]


class ChannelGate(nn.Module, ABC):
    """Abstract per-channel gate. Subclasses set ``num_channels`` and implement the three methods."""

    num_channels: int

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = check_int("num_channels", num_channels)

    @abstractmethod
    def forward(self) -> Tensor:
        """Per-channel multiplier, shape ``(num_channels,)``: a sample in training mode, deterministic in eval mode."""

    @abstractmethod
    def open_probability(self) -> Tensor:
        """Differentiable value in [0, 1] per channel, shape ``(num_channels,)``: how likely the channel is kept."""

    @abstractmethod
    def alive(self) -> Tensor:
        """Boolean tensor ``(num_channels,)``: the channels that are kept if the network is pruned now."""

    def to_fixed_mask(self) -> FixedMask:
        """A :class:`FixedMask` holding the current :meth:`alive` channels (the gate is frozen to 0/1)."""
        return FixedMask(self.alive().detach().clone())

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


class HardConcreteGate(ChannelGate):
    """Hard Concrete gate of L0 regularisation (Louizos et al. 2018), as used by BAR
    (Lemaire et al. 2019, supplementary material, Sec. 9).

    One learned ``log_alpha`` per channel, initialised ``U(init_log_alpha[0], init_log_alpha[1])``
    (default U(0, 0.01), Lemaire et al. 2019, supplementary material, Sec. 4). With ``beta``,
    ``gamma < 0``, ``zeta > 1`` fixed (supplementary material, eqs. 4-5):

    - training sample (one ``eps ~ U(0, 1)`` per channel per call):
      ``z = clamp(sigmoid((log eps - log(1 - eps) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)``;
      ``eps`` is clamped to ``[e, 1 - e]`` with ``e`` the machine epsilon of ``log_alpha``'s dtype so
      the logit stays finite; exact 0 and 1 still occur through the outer clamp;
    - ``open_probability() = P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``;
    - eval value ``z_hat = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``;
    - ``alive() = z_hat > 0``, i.e. ``log_alpha > log(-gamma / zeta)`` (= -ln 11 with the defaults).
    """

    def __init__(
        self,
        num_channels: int,
        beta: float = 2.0 / 3.0,
        gamma: float = -0.1,
        zeta: float = 1.1,
        init_log_alpha: tuple[float, float] = (0.0, 0.01),
    ) -> None:
        super().__init__(num_channels)
        beta = finite_real("beta", beta)
        gamma = finite_real("gamma", gamma)
        zeta = finite_real("zeta", zeta)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if gamma >= 0:
            raise ValueError(f"gamma must be < 0 (so that P(z = 0) > 0), got {gamma}")
        if zeta <= 1:
            raise ValueError(f"zeta must be > 1 (so that P(z = 1) > 0), got {zeta}")
        if not isinstance(init_log_alpha, (tuple, list)) or len(init_log_alpha) != 2:
            raise TypeError(f"init_log_alpha must be a (low, high) pair, got {init_log_alpha!r}")
        low = finite_real("init_log_alpha[0]", init_log_alpha[0])
        high = finite_real("init_log_alpha[1]", init_log_alpha[1])
        if low > high:
            raise ValueError(f"init_log_alpha must have low <= high, got {init_log_alpha!r}")
        self.beta = beta
        self.gamma = gamma
        self.zeta = zeta
        self.log_alpha = nn.Parameter(torch.empty(self.num_channels).uniform_(low, high))

    @property
    def log_alpha_threshold(self) -> float:
        """``log(-gamma / zeta)``: a channel is alive iff its ``log_alpha`` exceeds this (-ln 11 by default)."""
        return math.log(-self.gamma / self.zeta)

    def sample(self, noise: Tensor | None = None) -> Tensor:
        """A differentiable Hard Concrete sample ``z`` in [0, 1], shape ``(num_channels,)``.

        ``noise`` is the uniform ``eps`` per channel; drawn fresh when ``None``.
        """
        la = self.log_alpha
        if noise is None:
            noise = torch.rand(self.num_channels, dtype=la.dtype, device=la.device)
        elif not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a tensor or None, got {type(noise).__name__}")
        elif noise.shape != (self.num_channels,):
            raise ValueError(f"noise must have shape ({self.num_channels},), got {tuple(noise.shape)}")
        tiny = torch.finfo(la.dtype).eps
        eps = noise.to(dtype=la.dtype, device=la.device).clamp(tiny, 1.0 - tiny)
        s = torch.sigmoid((torch.log(eps) - torch.log1p(-eps) + la) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> Tensor:
        """The eval-mode gate ``z_hat`` in [0, 1], shape ``(num_channels,)``."""
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self) -> Tensor:
        return self.sample() if self.training else self.deterministic()

    def open_probability(self) -> Tensor:
        return torch.sigmoid(self.log_alpha - self.beta * self.log_alpha_threshold)

    @torch.no_grad()
    def alive(self) -> Tensor:
        return self.deterministic() > 0

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}"


def dirichlet_kl(phi: Tensor, alpha0: float) -> Tensor:
    """Closed-form ``KL(Dir(phi) || Dir(alpha0 * 1))`` over the last dimension of ``phi``: the
    KL term of the variational objective of Adamczewski and Park 2021.

    ``lnG(sum phi) - lnG(K alpha0) - sum lnG(phi) + K lnG(alpha0) + sum (phi - alpha0)(psi(phi) - psi(sum phi))``
    """
    if not isinstance(phi, Tensor):
        raise TypeError(f"phi must be a tensor, got {type(phi).__name__}")
    if phi.dim() < 1 or phi.shape[-1] < 1:
        raise ValueError(f"phi must have a non-empty last dimension, got shape {tuple(phi.shape)}")
    alpha0 = finite_real("alpha0", alpha0)
    if alpha0 <= 0:
        raise ValueError(f"alpha0 must be > 0, got {alpha0}")
    k = phi.shape[-1]
    total = phi.sum(-1)
    return (
        torch.lgamma(total)
        - math.lgamma(k * alpha0)
        - torch.lgamma(phi).sum(-1)
        + k * math.lgamma(alpha0)
        + ((phi - alpha0) * (torch.digamma(phi) - torch.digamma(total).unsqueeze(-1))).sum(-1)
    )


def _inverse_softplus(y: float) -> float:
    # softplus(x) = log(1 + e^x)  =>  x = y + log(1 - e^-y), stable for small and large y.
    return y + math.log(-math.expm1(-y))


class DirichletSwitch(ChannelGate):
    """Dirichlet importance switch of Dirichlet pruning (Adamczewski and Park 2021).

    Variational posterior ``q(s) = Dir(phi)``, ``phi = softplus(theta)``, over a switch ``s`` on the
    simplex; prior ``Dir(alpha0 * 1)`` (``alpha0 < 1`` favours sparse importance). The multiplier is
    ``K * s`` (K = ``num_channels``) so that a uniform switch is the identity:

    - ``estimator="mean"`` (default), and always in eval mode: ``s = E[s] = phi / sum(phi)``;
    - ``estimator="gamma"`` in training: a reparameterised sample ``s = g / sum(g)``,
      ``g_k ~ Gamma(phi_k, 1)`` (``torch.distributions.Gamma.rsample``, implicit gradients).
      Averaging over S samples is up to the caller (see :meth:`rsample`).

    ``theta`` starts equal for every channel with ``phi = init`` (default 1.0, the flat Dirichlet), so
    the switch starts uniform and the multiplier is exactly 1.

    ``open_probability()`` returns the *relative importance* ``phi / max(phi)`` (= posterior mean
    divided by its largest entry), in (0, 1]: 1 for the most important channel and for every channel
    of a uniform switch. It is not a calibrated keep probability: the method ranks channels by
    posterior mean and a separate allocation step chooses how many to keep. For the same reason
    ``alive()`` is all True: a switch prunes nothing until a mask is chosen (see :meth:`keep_top`),
    after which the caller replaces it by a :class:`FixedMask`.
    """

    ESTIMATORS = ("mean", "gamma")

    def __init__(
        self,
        num_channels: int,
        alpha0: float = 0.5,
        estimator: str = "mean",
        init: float = 1.0,
    ) -> None:
        super().__init__(num_channels)
        alpha0 = finite_real("alpha0", alpha0)
        if alpha0 <= 0:
            raise ValueError(f"alpha0 must be > 0, got {alpha0}")
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"estimator must be one of {self.ESTIMATORS}, got {estimator!r}")
        init = finite_real("init", init)
        if init <= 0:
            raise ValueError(f"init must be > 0 (the initial Dirichlet concentration), got {init}")
        self.alpha0 = alpha0
        self.estimator = estimator
        self.theta = nn.Parameter(torch.full((self.num_channels,), _inverse_softplus(init)))

    def concentration(self) -> Tensor:
        """``phi = softplus(theta)``, the posterior Dirichlet concentration, shape ``(num_channels,)``."""
        return F.softplus(self.theta)

    def _multiplier(self, x: Tensor) -> Tensor:
        # K * x / sum(x) along the last dim, computed as r * (K / sum r) with r = x / max(x): the same
        # value, but exactly 1 for equal entries (r == 1, sum r == K) and safe from overflow.
        r = x / x.amax(-1, keepdim=True)
        return r * (self.num_channels / r.sum(-1, keepdim=True))

    def posterior_mean(self) -> Tensor:
        """``E_q[s] = phi / sum(phi)``, shape ``(num_channels,)``, sums to 1; used to rank channels."""
        return self._multiplier(self.concentration()) / self.num_channels

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Reparameterised switch samples ``K * s``, ``s = g / sum g``, ``g ~ Gamma(phi, 1)``;
        shape ``(*sample_shape, num_channels)``."""
        phi = self.concentration()
        g = torch.distributions.Gamma(phi, torch.ones_like(phi)).rsample(torch.Size(sample_shape))
        return self._multiplier(g)

    def forward(self) -> Tensor:
        if self.training and self.estimator == "gamma":
            return self.rsample()
        return self._multiplier(self.concentration())

    def kl_divergence(self) -> Tensor:
        """Scalar ``KL(Dir(phi) || Dir(alpha0 * 1))`` (nats), differentiable in ``theta``."""
        return dirichlet_kl(self.concentration(), self.alpha0)

    def open_probability(self) -> Tensor:
        phi = self.concentration()
        return phi / phi.amax()

    @torch.no_grad()
    def alive(self) -> Tensor:
        return torch.ones(self.num_channels, dtype=torch.bool, device=self.theta.device)

    @torch.no_grad()
    def keep_top(self, k: int) -> Tensor:
        """Boolean mask of the ``k`` channels with the largest posterior mean (ties: lower index first)."""
        if check_int("k", k, 0) > self.num_channels:
            raise ValueError(f"k must be in [0, {self.num_channels}], got {k}")
        order = torch.sort(self.concentration(), descending=True, stable=True).indices
        mask = torch.zeros(self.num_channels, dtype=torch.bool, device=self.theta.device)
        mask[order[:k]] = True
        return mask

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, alpha0={self.alpha0}, estimator={self.estimator!r}"


class FixedMask(ChannelGate):
    """A frozen 0/1 gate: no parameters; ``mask`` is a (persistent) buffer, so it is saved in checkpoints."""

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.dim() != 1 or mask.numel() < 1:
            raise ValueError(f"mask must be 1-D and non-empty, got shape {tuple(mask.shape)}")
        super().__init__(mask.numel())
        self.register_buffer("mask", mask.detach().clone())

    def forward(self) -> Tensor:
        return self.mask.float()

    def open_probability(self) -> Tensor:
        return self.mask.float()

    def alive(self) -> Tensor:
        return self.mask.clone()

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, alive={int(self.mask.sum())}"
