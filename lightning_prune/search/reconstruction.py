"""Reconstruction of the score from its samples (Javaheripi, Samragh, Javidi and Koushanfar,
"AdaNS: Adaptive Non-Uniform Sampling for Automated Design of Compact DNNs", IEEE JSTSP 2020,
doi:10.1109/JSTSP.2020.2992384; Sec. VI, eqs. 14-17).

``f~(x) = sum_i w_i Gauss(x, x_i, Sigma_i)`` with one Gaussian kernel per evaluated sample,
a diagonal covariance ``sigma_m^2 = beta * (dx_i[m])^2`` where ``dx_i`` is the element-wise
distance to the nearest other sample and ``beta = d / (8 ln 2)`` (so a kernel is down to 1/2
at the midpoint to its nearest neighbour), and weights fitted by least squares. The
normalised error on new samples (eq. 14) tells exploitation (small) from exploration (large).
"""

from __future__ import annotations

import math

import numpy as np


class GaussianReconstruction:
    """Least-squares Gaussian-kernel estimate of a function from its samples.

    ``min_spread`` floors ``dx_i[m]`` so that two samples that agree exactly in one coordinate
    do not give a zero-width kernel.
    """

    def __init__(self, min_spread: float = 1e-3) -> None:
        if not min_spread > 0:
            raise ValueError(f"min_spread must be positive, got {min_spread!r}")
        self.min_spread = float(min_spread)
        self.centres: np.ndarray | None = None
        self.sigma2: np.ndarray | None = None
        self.weights: np.ndarray | None = None

    def kernels(self, x: np.ndarray) -> np.ndarray:
        """Value of every kernel (columns) at the rows of ``x`` (n, d)."""
        assert self.centres is not None and self.sigma2 is not None
        diff = x[:, None, :] - self.centres[None, :, :]
        return np.exp(-0.5 * np.sum(diff**2 / self.sigma2[None, :, :], axis=2))

    def fit(self, xs: np.ndarray, fs: np.ndarray) -> GaussianReconstruction:
        """Fit on samples ``xs`` (N, d) with values ``fs`` (N,); N >= 2."""
        xs = np.asarray(xs, dtype=float)
        fs = np.asarray(fs, dtype=float)
        if xs.ndim != 2 or fs.shape != (len(xs),) or len(xs) < 2:
            raise ValueError(f"xs must be (N, d) and fs (N,) with N >= 2, got {xs.shape} and {fs.shape}")
        d = xs.shape[1]
        dist = np.linalg.norm(xs[:, None, :] - xs[None, :, :], axis=2)
        np.fill_diagonal(dist, np.inf)
        nearest = np.argmin(dist, axis=1)
        spread = np.maximum(np.abs(xs - xs[nearest]), self.min_spread)
        beta = d / (8 * math.log(2))
        self.centres = xs
        self.sigma2 = beta * spread**2
        self.weights = np.linalg.lstsq(self.kernels(xs), fs, rcond=None)[0]
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Estimates at the rows of ``x`` (n, d)."""
        if self.weights is None:
            raise RuntimeError("fit() first")
        return self.kernels(np.atleast_2d(np.asarray(x, dtype=float))) @ self.weights


def reconstruction_error(xs: np.ndarray, fs: np.ndarray, new_xs: np.ndarray, new_fs: np.ndarray) -> float:
    """Mean absolute normalised error (eq. 14) on ``new_xs`` of the reconstruction fitted on
    ``xs``: ``mean |f(x) - f~(x)| / |f(x)|``."""
    new_fs = np.asarray(new_fs, dtype=float)
    est = GaussianReconstruction().fit(xs, fs).predict(new_xs)
    return float(np.mean(np.abs(new_fs - est) / np.abs(new_fs)))
