"""Architecture compression by gradient descent in the learned embedding (Ashok, "Architecture
Compression", arXiv:1902.03326, 2019, Sec. 4.4, Algorithm 1).

Encode the network's tokens to ``y``; take ``steps`` gradient steps on ``y`` for

    L_c = L_a(a_hat, a0) + lambda * L_p(p_hat, p0)          (Eq. 17; Eq. 16 is a0 = 1, p0 = 0)

(L1 and Huber, as in training; ``p0`` is a standardised parameter count, 0 being the training
set's mean, or given as a parameter count); decode ``y``, round, repair and rebuild the network
(:func:`tokens.plan` with ``repair=True``).

Ashok 2019 (Sec. 5.3) notes that the regressors are accurate for the first ~5 steps and drift
afterwards, and that a few supervised fine-tuning steps at a small learning rate help. With
``refit_steps > 0`` the two regressors (not the encoder/decoder, so that ``y`` keeps its
meaning) are re-fitted every ``refit_every`` steps on batches of the training architectures
plus the network being compressed (its accuracy when known) and every architecture decoded so
far, whose exact parameter count is known without training.

The compressor passed in is not modified (a copy is refitted).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune._checks import check_int
from lightning_prune.archcomp.compressor import ArchitectureCompressor
from lightning_prune.archcomp.data import make_sample
from lightning_prune.archcomp.tokens import InvalidArchitecture, Plan, Token, build, plan
from lightning_prune.core.cost import count_cost


def architecture(tokens: Sequence[Sequence[int]], input_shape: Sequence[int]) -> dict:
    """The ``architecture`` under which ``lightning_prune.save_pruned`` saves the network of
    ``tokens`` (plain data; ``lightning_prune.load_pruned`` rebuilds it with
    :func:`lightning_prune.archcomp.models.build`)."""
    return {"_target_": "lightning_prune.archcomp.models.build", "tokens": [[int(v) for v in t] for t in tokens],
            "input_shape": [int(v) for v in input_shape]}


@dataclass(frozen=True)
class CompressionStep:
    """The state after ``step`` gradient steps on y (step 0 = the encoded original)."""

    step: int
    loss: float
    predicted_accuracy: float
    predicted_params: float
    tokens: tuple[Token, ...] | None  # decoded and repaired; None when the decoding is unusable
    params: int | None  # exact parameter count of ``tokens``
    repairs: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class CompressionResult:
    """What :func:`compress` found. ``net`` is freshly initialised (train it); ``params`` is
    measured on it with :func:`lightning_prune.count_cost`."""

    original_tokens: tuple[Token, ...]
    original_params: int
    tokens: tuple[Token, ...]
    net: nn.Module
    params: int
    step: int
    predicted_accuracy: float
    predicted_params: float
    repairs: tuple[str, ...]
    trajectory: list[CompressionStep] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Compression rate: original parameters / compressed parameters."""
        return self.original_params / self.params


def _decode(compressor: ArchitectureCompressor, y: Tensor, input_shape: Sequence[int], num_classes: int) -> tuple[Plan | None, str | None]:
    rows = compressor.tokens_from_features(compressor.decode(y))[0]
    try:
        return plan(rows, input_shape, num_classes=num_classes, repair=True), None
    except InvalidArchitecture as err:
        return None, str(err)


def compress(
    compressor: ArchitectureCompressor,
    tokens: Sequence[Sequence[int]],
    input_shape: Sequence[int],
    num_classes: int,
    *,
    accuracy_target: float = 1.0,
    params_target: float | None = None,
    lam: float = 1.0,
    steps: int = 10,
    lr: float = 0.1,
    original_accuracy: float | None = None,
    refit_data: Iterable[dict[str, Tensor]] | None = None,
    refit_steps: int = 0,
    refit_every: int = 5,
    refit_lr: float = 1e-3,
) -> CompressionResult:
    """Compress the architecture ``tokens`` (for inputs of ``input_shape``, ``num_classes`` outputs).

    Args:
        compressor: a trained :class:`ArchitectureCompressor`.
        accuracy_target: ``a0`` of Eq. 17 (1 in Eq. 16).
        params_target: ``p0`` as a parameter count; None = the paper's ``p0 = 0``, i.e. the
            training architectures' (geometric) mean parameter count.
        lam: ``lambda`` of Eq. 17, weight of the parameter term.
        steps, lr: number and size of the gradient-descent steps on y.
        original_accuracy: the original network's measured accuracy, used by the re-fit.
        refit_data: batches of training architectures (e.g. the compressor datamodule's
            ``train_dataloader()``); required when ``refit_steps > 0``.
        refit_steps, refit_every, refit_lr: supervised steps of the regressors, done before the
            first step and again every ``refit_every`` steps (0 = no re-fit).

    The result is the decoding after the last step when it yields a valid network, otherwise
    the latest step that does; if none does, :class:`InvalidArchitecture` is raised.
    """
    if not isinstance(compressor, ArchitectureCompressor):
        raise TypeError(f"compressor must be an ArchitectureCompressor, got {type(compressor).__name__}")
    check_int("steps", steps, 0)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= accuracy_target <= 1:
        raise ValueError(f"accuracy_target must be in [0, 1], got {accuracy_target}")
    if params_target is not None and not params_target > 0:
        raise ValueError(f"params_target must be None or a positive parameter count, got {params_target}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    check_int("refit_steps", refit_steps, 0)
    if refit_steps and refit_data is None:
        raise ValueError("refit_data is required when refit_steps > 0")
    check_int("refit_every", refit_every)

    original = plan(tokens, input_shape, num_classes=num_classes)
    model = copy.deepcopy(compressor).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, mask = model.pad([list(original.tokens)])
    with torch.no_grad():
        y = model.encode(x, mask)
    z0 = torch.zeros(1) if params_target is None else model.params_to_z(torch.tensor([float(params_target)]))
    a0 = torch.tensor([float(accuracy_target)])

    known: list[dict[str, Tensor]] = [make_sample(original.tokens, model.max_len, original_accuracy, original.params)]
    refit_batches = itertools.cycle(refit_data) if refit_steps else None
    regressors = [*model.accuracy_regressor.parameters(), *model.params_regressor.parameters()]
    refit_opt = torch.optim.SGD(regressors, lr=refit_lr, momentum=0.5, nesterov=True) if refit_steps else None

    def refit() -> None:
        for p in regressors:
            p.requires_grad_(True)
        for _ in range(refit_steps):
            batch = next(refit_batches)  # type: ignore[arg-type]
            merged = {k: torch.cat([batch[k], torch.stack([s[k] for s in known])]) for k in known[0]}
            with torch.no_grad():
                emb = model.encode(merged["tokens"], merged["mask"])
            acc_hat, z_hat = model.predict(emb)
            loss_a, loss_p = model.regressor_losses(acc_hat, z_hat, merged)
            refit_opt.zero_grad()  # type: ignore[union-attr]
            (model.lambda_acc * loss_a + model.lambda_params * loss_p).backward()
            refit_opt.step()  # type: ignore[union-attr]
        for p in regressors:
            p.requires_grad_(False)

    trajectory: list[CompressionStep] = []
    seen: set[tuple[Token, ...]] = {original.tokens}
    for step in range(steps + 1):
        if refit_steps and step % refit_every == 0 and step < steps:
            refit()
        y = y.detach().requires_grad_(True)
        acc_hat, z_hat = model.predict(y)
        loss = (acc_hat - a0).abs().mean() + lam * F.huber_loss(z_hat, z0, delta=model.huber_delta)
        with torch.no_grad():
            decoded, error = _decode(model, y, input_shape, num_classes)
        trajectory.append(
            CompressionStep(
                step=step,
                loss=loss.item(),
                predicted_accuracy=acc_hat.item(),
                predicted_params=float(model.z_to_params(z_hat.detach())),
                tokens=decoded.tokens if decoded else None,
                params=decoded.params if decoded else None,
                repairs=decoded.repairs if decoded else (),
                error=error,
            )
        )
        if decoded is not None and decoded.tokens not in seen and len(decoded.tokens) <= model.max_len:
            seen.add(decoded.tokens)
            known.append(make_sample(decoded.tokens, model.max_len, None, decoded.params))
        if step == steps:
            break
        (grad,) = torch.autograd.grad(loss, y)
        y = y - lr * grad  # descend L_c (Algorithm 1 prints "+", a sign slip: Eq. 16 is minimised)

    chosen = next((s for s in reversed(trajectory) if s.tokens is not None), None)
    if chosen is None or chosen.tokens is None:
        raise InvalidArchitecture([f"no step decoded to a valid network; last error: {trajectory[-1].error}"])
    final = plan(chosen.tokens, input_shape, num_classes=num_classes)
    net = build(final)
    measured = count_cost(net, torch.zeros(1, *final.input_shape)).params
    return CompressionResult(
        original_tokens=original.tokens,
        original_params=original.params,
        tokens=final.tokens,
        net=net,
        params=measured,
        step=chosen.step,
        predicted_accuracy=chosen.predicted_accuracy,
        predicted_params=chosen.predicted_params,
        repairs=chosen.repairs,
        trajectory=trajectory,
    )
