"""The architecture compressor of Ashok, "Architecture Compression", arXiv:1902.03326, 2019,
Sec. 4: 1-D CNN encoder/decoder and two regressors.

A token sequence ``x`` (T x 5, see :mod:`lightning_prune.archcomp.tokens`) is zero-padded to
``max_len`` positions (the zero token means "no layer") with a mask of the real positions.
Each token is turned into 5 features ``[t, k, log2(1 + o), s, p] / token_scale``; padding stays
exactly 0. The paper regresses the raw integers and rounds. Here the features are in *rounding
units*: with the default ``token_scale = (1, 1, 0.25, 1, 1)`` an error of 0.5 flips the rounded
type, kernel, stride or padding, and 0.5 on the channel feature ``4 log2(1 + o)`` is a change
of about 9% of the channel count (an error relative to the width, so the paper's o ~ U(16, 4096)
is not dominated by its largest values). The MSE thus weighs every field by how close it is to
being decoded wrong. (Scaling each feature to unit RMS instead left the type, the field whose
range is widest relative to its rounding step, the least precise: on the CPU benchmark no
held-out sequence decoded with all its layer types right, against all of them with this scale.)

- Encoder (Appendix 8): residual 1-D conv blocks ``x' = ReLU(BN(conv(x))) + x``, and strided
  ones ``x' = ReLU(BN(conv_s(x))) + conv_s'(x)`` halving the length; activations at padded
  positions are zeroed after every block (the mask, max-pooled along with the length). The
  embedding ``y`` is the final feature map, flattened: ``N = latent_channels * max_len / 2**depth``.
- Decoder: the same with transposed convolutions, back to ``max_len x 5`` features; it
  emits (near) zero tokens where the sequence has ended, which is how it says the length.
- Accuracy regressor: 3 fc-ReLU blocks, an fc output and a sigmoid (accuracy in [0, 1]).
- Parameter regressor: 3 fc-ReLU blocks, an fc output and a ReLU. Its target is the
  standardised parameter count ``z = (log p - mean) / std`` (the paper standardises p itself;
  parameter counts of random architectures span orders of magnitude, so the log is used).
  A ReLU output cannot be negative while a standardised target is, so the ReLU predicts
  ``z - floor``, where ``floor`` is one below the smallest training ``z``; its output bias
  starts at ``-floor`` (predicting the mean), which keeps the ReLU from starting dead.

Loss (Eq. 15): ``L = L_d + lambda_acc * L_a + lambda_params * L_p`` with L_d the MSE over all
``max_len x 5`` features (padding included), L_a the L1 error of the accuracy and L_p the
Huber loss (delta 1) of ``z``. The default optimiser is Ashok 2019, Sec. 5.2.2: SGD with Nesterov
momentum 0.5, learning rate 0.003, multiplied by 1/5 every 30 epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.regression import SpearmanCorrCoef

from lightning_prune._checks import check_int
from lightning_prune.classifier import optimizers_from_factories
from lightning_prune.archcomp.tokens import NUM_FIELDS, pad_sequences

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class ResidualBlock1d(nn.Module):
    """``ReLU(BN(conv(x))) + shortcut(x)``; ``stride`` 2 halves (transposed: doubles) the length."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, transposed: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if transposed:
            if stride == 1:
                self.conv = nn.ConvTranspose1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
            else:
                self.conv = nn.ConvTranspose1d(c_in, c_out, 4, stride=2, padding=1)
            shortcut = nn.ConvTranspose1d(c_in, c_out, stride, stride=stride)
        else:
            self.conv = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2)
            shortcut = nn.Conv1d(c_in, c_out, 1, stride=stride)
        self.bn = nn.BatchNorm1d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else shortcut

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x))) + self.shortcut(x)


class Encoder1d(nn.Module):
    """Token features (B, 5, L) and mask (B, L) -> embedding y (B, N)."""

    def __init__(self, channels: int, depth: int, blocks: int, latent_channels: int) -> None:
        super().__init__()
        self.stem = ResidualBlock1d(NUM_FIELDS, channels)
        self.stages = nn.ModuleList()
        for _ in range(depth):
            self.stages.append(nn.ModuleList([ResidualBlock1d(channels, channels) for _ in range(blocks)]))
            self.stages.append(nn.ModuleList([ResidualBlock1d(channels, channels, stride=2)]))
        self.head = nn.Conv1d(channels, latent_channels, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(1).to(x.dtype)
        x = self.stem(x * m) * m
        for stage in self.stages:
            for block in stage:
                x = block(x)
                if x.shape[-1] != m.shape[-1]:
                    m = F.max_pool1d(m, 2)
                x = x * m
        return (self.head(x) * m).flatten(1)


class Decoder1d(nn.Module):
    """Embedding y (B, N) -> token features (B, 5, max_len), with transposed convolutions."""

    def __init__(self, channels: int, depth: int, blocks: int, latent_channels: int, max_len: int) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.latent_len = max_len >> depth
        self.stem = ResidualBlock1d(latent_channels, channels, transposed=True)
        stages: list[nn.Module] = []
        for _ in range(depth):
            stages.append(ResidualBlock1d(channels, channels, stride=2, transposed=True))
            stages += [ResidualBlock1d(channels, channels, transposed=True) for _ in range(blocks)]
        self.stages = nn.Sequential(*stages)
        self.head = nn.ConvTranspose1d(channels, NUM_FIELDS, 3, padding=1)

    def forward(self, y: Tensor) -> Tensor:
        x = y.view(y.shape[0], self.latent_channels, self.latent_len)
        return self.head(self.stages(self.stem(x)))


def regressor(in_features: int, hidden: int, output: nn.Module, dropout: float = 0.0) -> nn.Sequential:
    """3 fc-ReLU blocks, then an fc to one output followed by ``output`` (Ashok 2019, Sec. 4.2)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(3):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers += [nn.Linear(width, 1), output]
    return nn.Sequential(*layers)


class ArchitectureCompressor(L.LightningModule):
    """Encoder, decoder, accuracy and parameter regressors, trained jointly (Ashok 2019, eq. 15).

    Args:
        max_len: padded sequence length (a multiple of ``2**depth``); longer sequences are refused.
        token_scale: the 5 per-feature scales (see the module docstring).
        param_mean, param_std: mean and std of log(parameters) over the training architectures.
        param_floor: lowest standardised parameter count the ReLU head can predict.
        channels, depth, blocks, latent_channels: encoder/decoder width, number of halvings of
            the length, residual blocks per stage, channels of the embedding.
        hidden: width of the regressors' fc layers; ``regressor_dropout`` after each.
        lambda_acc, lambda_params: ``l1`` and ``l2`` of Eq. 15.
        huber_delta: delta of the parameter loss (1 in the paper).
        optimizer, scheduler: factories (Hydra ``_partial_: true``); default Ashok 2019, Sec. 5.2.2.
    """

    def __init__(
        self,
        max_len: int = 32,
        token_scale: Sequence[float] = (1.0, 1.0, 0.25, 1.0, 1.0),
        param_mean: float = 0.0,
        param_std: float = 1.0,
        param_floor: float = -3.0,
        channels: int = 64,
        depth: int = 2,
        blocks: int = 1,
        latent_channels: int = 16,
        hidden: int = 128,
        regressor_dropout: float = 0.0,
        lambda_acc: float = 1.0,
        lambda_params: float = 1.0,
        huber_delta: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        for name, value in (("max_len", max_len), ("channels", channels), ("latent_channels", latent_channels), ("hidden", hidden)):
            check_int(name, value)
        check_int("depth", depth, 0)
        check_int("blocks", blocks, 0)
        if max_len % (2**depth):
            raise ValueError(f"max_len must be a multiple of 2**depth = {2**depth}, got {max_len}")
        if len(token_scale) != NUM_FIELDS or not all(float(v) > 0 for v in token_scale):
            raise ValueError(f"token_scale must be 5 positive numbers, got {token_scale!r}")
        if not param_std > 0:
            raise ValueError(f"param_std must be > 0, got {param_std}")
        for name, value in (("lambda_acc", lambda_acc), ("lambda_params", lambda_params), ("huber_delta", huber_delta)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0 <= regressor_dropout < 1:
            raise ValueError(f"regressor_dropout must be in [0, 1), got {regressor_dropout}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a callable taking the parameters (Hydra: _partial_: true)")
        if scheduler is not None and not callable(scheduler):
            raise TypeError("scheduler must be None or a callable taking the optimizer (Hydra: _partial_: true)")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        # plain floats (Hydra hands over ListConfig) so that checkpoints load with weights_only
        token_scale = [float(v) for v in token_scale]
        param_mean, param_std, param_floor = float(param_mean), float(param_std), float(param_floor)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.register_buffer("token_scale", torch.tensor(token_scale))
        self.max_len = max_len
        self.param_mean, self.param_std, self.param_floor = float(param_mean), float(param_std), float(param_floor)
        self.lambda_acc, self.lambda_params, self.huber_delta = lambda_acc, lambda_params, huber_delta
        self.encoder = Encoder1d(channels, depth, blocks, latent_channels)
        self.decoder = Decoder1d(channels, depth, blocks, latent_channels, max_len)
        self.embedding_dim = latent_channels * (max_len >> depth)
        self.accuracy_regressor = regressor(self.embedding_dim, hidden, nn.Sigmoid(), regressor_dropout)
        self.params_regressor = regressor(self.embedding_dim, hidden, nn.ReLU(), regressor_dropout)
        # Start the ReLU head in its active region, predicting z = 0 (the mean): with the
        # default init it often starts below 0 for every input and its gradient is dead.
        with torch.no_grad():
            self.params_regressor[-2].bias.fill_(-self.param_floor if self.param_floor < 0 else 0.0)
        self.optimizer_factory = optimizer or partial(torch.optim.SGD, lr=0.003, momentum=0.5, nesterov=True)
        self.scheduler_factory = scheduler if optimizer is not None else (
            scheduler or partial(torch.optim.lr_scheduler.StepLR, step_size=30, gamma=0.2)
        )
        self.scheduler_interval = scheduler_interval
        self.val_spearman = SpearmanCorrCoef()

    # --- representation -------------------------------------------------------------------
    def features(self, tokens: Tensor) -> Tensor:
        """Integer tokens (B, L, 5), zero-padded -> normalised features (B, 5, L)."""
        x = tokens.to(self.token_scale.dtype).clone()
        x[..., 2] = torch.log2(1 + x[..., 2].clamp_min(0))
        return (x / self.token_scale).transpose(1, 2)

    def tokens_from_features(self, x: Tensor) -> list[list[list[int]]]:
        """Decoded features (B, 5, L) -> per sample, the rounded tokens of the non-empty positions
        (``round(t) >= 1``); further repairs are left to :func:`tokens.plan` with ``repair=True``."""
        raw = x.transpose(1, 2) * self.token_scale
        raw[..., 2] = torch.exp2(raw[..., 2].clamp(max=30)) - 1
        rounded = raw.round().long().clamp_min(0)
        return [[row for row in seq.tolist() if row[0] >= 1] for seq in rounded]

    def pad(self, sequences: Sequence[Sequence[Sequence[int]]]) -> tuple[Tensor, Tensor]:
        """Token sequences -> (tokens (B, max_len, 5) long, mask (B, max_len) bool) on this module's device."""
        tokens, mask = pad_sequences(sequences, self.max_len)
        return tokens.to(self.token_scale.device), mask.to(self.token_scale.device)

    def params_to_z(self, params: Tensor) -> Tensor:
        """Parameter counts -> standardised log counts (the regressor's target)."""
        return (torch.log(params.to(self.token_scale.dtype).clamp_min(1)) - self.param_mean) / self.param_std

    def z_to_params(self, z: Tensor) -> Tensor:
        return torch.exp(z * self.param_std + self.param_mean)

    # --- networks ---------------------------------------------------------------------------
    def encode(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.encoder(self.features(tokens), mask)

    def decode(self, y: Tensor) -> Tensor:
        return self.decoder(y)

    def predict(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted accuracy in [0, 1] and standardised parameter count z, each of shape (B,)."""
        return self.accuracy_regressor(y).squeeze(-1), self.params_regressor(y).squeeze(-1) + self.param_floor

    def forward(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        y = self.encode(tokens, mask)
        acc, z = self.predict(y)
        return {"y": y, "x_hat": self.decode(y), "accuracy": acc, "params_z": z}

    # --- training ---------------------------------------------------------------------------
    def regressor_losses(self, acc_hat: Tensor, z_hat: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(L_a, L_p); samples with ``accuracy_weight`` 0 (accuracy unknown) do not count in L_a."""
        weight = batch.get("accuracy_weight")
        l1 = (acc_hat - batch["accuracy"].to(acc_hat.dtype)).abs()
        loss_a = l1.mean() if weight is None else (l1 * weight).sum() / weight.sum().clamp_min(1)
        loss_p = F.huber_loss(z_hat, self.params_to_z(batch["params"]), delta=self.huber_delta)
        return loss_a, loss_p

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = self(batch["tokens"], batch["mask"])
        loss_d = F.mse_loss(out["x_hat"], self.features(batch["tokens"]))
        loss_a, loss_p = self.regressor_losses(out["accuracy"], out["params_z"], batch)
        total = loss_d + self.lambda_acc * loss_a + self.lambda_params * loss_p
        return {"loss": total, "loss_d": loss_d, "loss_a": loss_a, "loss_p": loss_p, **out}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        parts = self.losses(batch)
        for key in ("loss", "loss_d", "loss_a", "loss_p"):
            self.log(f"train/{key}", parts[key], prog_bar=key == "loss", batch_size=len(batch["mask"]))
        return parts["loss"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        parts = self.losses(batch)
        n = len(batch["mask"])
        for key in ("loss", "loss_d", "loss_a", "loss_p"):
            self.log(f"val/{key}", parts[key], prog_bar=key == "loss", batch_size=n)
        self.log("val/acc_mae", (parts["accuracy"] - batch["accuracy"]).abs().mean(), prog_bar=True, batch_size=n)
        self.val_spearman.update(parts["params_z"], self.params_to_z(batch["params"]))
        self.log("val/params_spearman", self.val_spearman, prog_bar=True)
        rel = (self.z_to_params(parts["params_z"]) / batch["params"].to(parts["params_z"].dtype) - 1).abs()
        self.log("val/params_rel_err", rel.mean(), batch_size=n)
        for key, value in self.reconstruction(parts["x_hat"], batch["tokens"], batch["mask"]).items():
            self.log(f"val/{key}", value, batch_size=n)

    def reconstruction(self, x_hat: Tensor, tokens: Tensor, mask: Tensor) -> dict[str, float]:
        """How well decoded features (B, 5, L) give back ``tokens`` after rounding.

        ``token_exact``: fraction of real tokens with all 5 fields right (position by position);
        ``seq_exact``: fraction of sequences decoded exactly, length included; ``types_exact``:
        fraction of sequences whose list of layer types (hence length) is right;
        ``channels_rel_err``: mean relative error of ``o`` over the tokens whose type is right.
        """
        decoded = self.tokens_from_features(x_hat)
        tok_hits, seq_hits, type_hits, rel_errs = 0, 0, 0, []
        for seq, true, m in zip(decoded, tokens.tolist(), mask.tolist()):
            true_seq = [row for row, keep in zip(true, m) if keep]
            tok_hits += sum(1 for a, b in zip(seq, true_seq) if a == b)
            seq_hits += int(seq == true_seq)
            type_hits += int([r[0] for r in seq] == [r[0] for r in true_seq])
            rel_errs += [abs(a[2] - b[2]) / max(1, b[2]) for a, b in zip(seq, true_seq) if a[0] == b[0]]
        n = max(1, len(decoded))
        return {
            "token_exact": tok_hits / max(1, int(mask.sum())),
            "seq_exact": seq_hits / n,
            "types_exact": type_hits / n,
            "channels_rel_err": sum(rel_errs) / len(rel_errs) if rel_errs else float("nan"),
        }

    def configure_optimizers(self) -> Any:
        return optimizers_from_factories(self.parameters(), self.optimizer_factory, self.scheduler_factory, self.scheduler_interval)

