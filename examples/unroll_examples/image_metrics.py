"""Measurements for the MNIST-family experiments of Metz et al. (2017).

* Stacked MNIST (Sec. 3.3.1, Table 1): modes covered and KL(model || uniform over 1000 modes) from the mode
  labels ``100*d1 + 10*d2 + d3`` that a digit classifier assigns to the three channels.
* Colored MNIST (Sec. 3.3.2, Table 2): the foreground colour of each image by 2-cluster k-means over its
  pixels, a Gaussian KDE over the colours of data and of samples, and the Jensen-Shannon divergence between
  the two KDEs, estimated by Monte Carlo (in nats, so it lies in [0, ln 2]).
* Pairwise l2 distances between random pairs of images and their histogram (Sec. 3.4.2).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
from scipy import stats
from torch import Tensor

N_STACKED_MODES = 1000


# --------------------------------------------------------------------------------- modes and KL (Table 1)


def mode_counts(labels: Tensor, n_modes: int = N_STACKED_MODES) -> Tensor:
    """Histogram [n_modes] of integer mode labels in ``0..n_modes-1``."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_modes):
        raise ValueError(f"labels must lie in [0, {n_modes}), got [{int(labels.min())}, {int(labels.max())}]")
    return torch.bincount(labels, minlength=n_modes)


def modes_covered(labels: Tensor, n_modes: int = N_STACKED_MODES) -> int:
    """Number of modes with at least one sample."""
    return int((mode_counts(labels, n_modes) > 0).sum())


def kl_to_uniform(labels: Tensor, n_modes: int = N_STACKED_MODES) -> float:
    """KL(p_model || uniform) in nats, with ``p_model`` the empirical label distribution:
    ``sum_k p_k log(p_k * n_modes)`` (``0 log 0 = 0``); 0 for a perfectly uniform histogram, ``log n_modes`` when
    every sample falls in one mode."""
    counts = mode_counts(labels, n_modes).double()
    total = counts.sum()
    if total == 0:
        raise ValueError("no labels given")
    p = counts[counts > 0] / total
    return float((p * torch.log(p * n_modes)).sum())


class ModeStats(NamedTuple):
    modes: int
    kl: float
    n_samples: int


def stacked_mode_stats(labels: Tensor, n_modes: int = N_STACKED_MODES) -> ModeStats:
    """Table 1's two numbers for one model: modes covered and KL to uniform."""
    return ModeStats(modes_covered(labels, n_modes), kl_to_uniform(labels, n_modes), int(torch.numel(labels)))


# -------------------------------------------------------------------------- foreground colour (Table 2)


def _nearer_second(pixels: Tensor, centroids: Tensor) -> Tensor:
    """[B, P] bool: is each pixel nearer centroid 1 than centroid 0? (A half-space test, cheaper than cdist.)"""
    c0, c1 = centroids[:, 0], centroids[:, 1]
    offset = 0.5 * ((c1 ** 2).sum(-1) - (c0 ** 2).sum(-1))
    return torch.einsum("bpc,bc->bp", pixels, c1 - c0) > offset[:, None]


def _two_means(pixels: Tensor, iters: int) -> Tuple[Tensor, Tensor]:
    """Lloyd's algorithm with k = 2 on each row of ``pixels`` [B, P, C] at once.

    Deterministic start: the per-channel median pixel (the background, which covers most of an image) and the
    pixel farthest from it. Returns ``(centroids [B, 2, C], counts [B, 2])``.
    """
    first = pixels.median(dim=1).values  # [B, C]
    far = ((pixels - first[:, None]) ** 2).sum(-1).argmax(dim=1)  # [B]
    second = pixels[torch.arange(pixels.shape[0]), far]
    centroids = torch.stack([first, second], dim=1)  # [B, 2, C]
    total = pixels.sum(dim=1)  # [B, C]
    n_pixels = pixels.shape[1]
    assign = _nearer_second(pixels, centroids)
    for _ in range(iters):
        n1 = assign.sum(dim=1, keepdim=True).to(pixels.dtype)  # [B, 1]
        sum1 = torch.einsum("bp,bpc->bc", assign.to(pixels.dtype), pixels)
        counts = torch.stack([n_pixels - n1, n1], dim=1)  # [B, 2, 1]
        sums = torch.stack([total - sum1, sum1], dim=1)
        # An empty cluster keeps its old centroid rather than becoming NaN.
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        new_assign = _nearer_second(pixels, centroids)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    n1 = assign.sum(dim=1)
    return centroids, torch.stack([n_pixels - n1, n1], dim=1)


def foreground_colors(images: Tensor, iters: int = 30, chunk: int = 512) -> Tensor:
    """Foreground colour [N, 3] of each RGB image [N, 3, H, W] by 2-cluster k-means over its pixels.

    The foreground is the smaller cluster: digit strokes cover a minority of an MNIST image (about 19% of
    28x28, 15% of 32x32), whatever colour they have. This mirrors Sec. 3.3.2 ("k-means with 2 clusters, to pick
    out the foreground color from the background") and is applied identically to data and samples.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    pixels = images.detach().float().flatten(2).transpose(1, 2)  # [N, H*W, C]
    out = []
    for start in range(0, pixels.shape[0], chunk):
        centroids, counts = _two_means(pixels[start:start + chunk], iters)
        fg = counts.argmin(dim=1)
        out.append(centroids[torch.arange(centroids.shape[0]), fg])
    return torch.cat(out) if out else images.new_zeros(0, images.shape[1])


# ---------------------------------------------------------------------------------- KDE and JS divergence


def fit_kde(points: Tensor, bandwidth: Optional[float] = None) -> stats.gaussian_kde:
    """Gaussian KDE over points [N, D] (scipy; Scott's rule unless ``bandwidth`` is a scalar factor)."""
    data = torch.as_tensor(points).detach().double().cpu().numpy().T
    return stats.gaussian_kde(data, bw_method=bandwidth)


def kde_logpdf(kde: stats.gaussian_kde, x: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """``kde.logpdf(x)`` for ``x`` [D, M], computed in torch by whitening with the kernel covariance.

    scipy's evaluation is several times slower for the 10^4 x 10^4 point pairs of Table 2; distances are taken
    in float32 (log-density error ~1e-5, far below the Monte Carlo error of the JS estimate).
    """
    chol = torch.linalg.cholesky(torch.as_tensor(kde.covariance, dtype=torch.float64))

    def whiten(pts: np.ndarray) -> Tensor:  # [D, M] -> rows of whitened points [M, D]
        return torch.linalg.solve_triangular(chol, torch.as_tensor(pts, dtype=torch.float64), upper=False).T

    centers, queries = whiten(kde.dataset).float(), whiten(x).float()
    dim, n = kde.dataset.shape
    log_norm = math.log(n) + 0.5 * dim * math.log(2 * math.pi) + float(torch.log(torch.diagonal(chol)).sum())
    out = [torch.logsumexp(-0.5 * torch.cdist(queries[i:i + chunk], centers) ** 2, dim=1)
           for i in range(0, queries.shape[0], chunk)]
    return (torch.cat(out).double() - log_norm).numpy()


def js_divergence_kde(p_points: Tensor, q_points: Tensor, n_samples: int = 5_000, seed: int = 0,
                      bandwidth: Optional[float] = None) -> float:
    """Jensen-Shannon divergence in nats between Gaussian KDEs fitted to ``p_points`` and ``q_points`` [N, D].

    Monte Carlo: with ``m = (p + q) / 2``, ``JS = E_p[log p/m] / 2 + E_q[log q/m] / 2`` using ``n_samples``
    draws from each KDE (a grid is too coarse or too slow for 3-D colours with 10^4-point KDEs). Deterministic
    in ``seed``.
    """
    kde_p, kde_q = fit_kde(p_points, bandwidth), fit_kde(q_points, bandwidth)
    rng = np.random.default_rng(seed)
    total = 0.0
    for own, other in ((kde_p, kde_q), (kde_q, kde_p)):
        x = own.resample(n_samples, seed=rng)
        log_own, log_other = kde_logpdf(own, x), kde_logpdf(other, x)
        log_mix = np.logaddexp(log_own, log_other) - math.log(2.0)
        total += 0.5 * float(np.mean(log_own - log_mix))
    # Each half is an average of log-ratios that can dip below zero by Monte Carlo noise; JS itself cannot.
    return max(total, 0.0)


def color_js_divergence(data_images: Tensor, sample_images: Tensor, n_samples: int = 5_000,
                        seed: int = 0) -> float:
    """Table 2's measure: JS divergence between the KDEs of the foreground colours of data and samples."""
    return js_divergence_kde(foreground_colors(data_images), foreground_colors(sample_images), n_samples, seed)


# ------------------------------------------------------------------------------------ pairwise distances


def pairwise_l2_distances(images: Tensor, n_pairs: int, generator: torch.Generator) -> Tensor:
    """l2 distances [n_pairs] between random pairs of distinct images (rows of ``images`` [N, ...])."""
    n = images.shape[0]
    if n < 2:
        raise ValueError("need at least two images")
    first = torch.randint(n, (n_pairs,), generator=generator)
    # An offset in 1..n-1 guarantees the partner is a different image.
    second = (first + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    flat = images.reshape(n, -1).float()
    return (flat[first] - flat[second]).norm(dim=1)


def distance_histogram(distances: Tensor, bins: int = 50,
                       value_range: Optional[Tuple[float, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Density-normalised histogram ``(density [bins], edges [bins + 1])``; pass the same ``value_range`` for
    data and every model so the curves share bins (Fig. 6)."""
    values = torch.as_tensor(distances).detach().double().cpu().numpy()
    return np.histogram(values, bins=bins, range=value_range, density=True)
