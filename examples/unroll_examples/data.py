"""2-D mixtures of Gaussians: the paper's ring (App. A), the VEEGAN/PacGAN ring and the 5x5 grid.

All sampling takes an explicit ``torch.Generator`` so every stream is reproducible and can be drawn per seed
outside ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

DATASETS = ("ring", "ring-veegan", "grid")
"""``ring``: Metz et al. App. A (8 modes, radius 2, std 0.02); ``ring-veegan``: VEEGAN/PacGAN (radius 1,
std 0.01); ``grid``: VEEGAN/PacGAN 5x5 grid on {-4,-2,0,2,4}^2 with std 0.05."""


@dataclass(frozen=True)
class Mixture:
    """An isotropic Gaussian mixture: ``centers`` [M, 2], common ``std``, mode ``weights`` [M] summing to 1."""

    name: str
    centers: Tensor
    std: float
    weights: Tensor

    @property
    def n_modes(self) -> int:
        return int(self.centers.shape[0])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` points [n, 2]; the mode draw and the noise both come from ``generator``."""
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=self.centers.dtype)
        return self.centers[modes] + self.std * noise


def ring_centers(n_modes: int, radius: float) -> Tensor:
    # endpoint excluded: the official notebook's linspace(0, 2pi, 8) puts modes 0 and 7 on the same point.
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    return (radius * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


def grid_centers(side: int = 5, spacing: float = 2.0) -> Tensor:
    coords = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    xs, ys = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


_SPECS: Dict[str, tuple] = {
    "ring": (lambda: ring_centers(8, 2.0), 0.02),
    "ring-veegan": (lambda: ring_centers(8, 1.0), 0.01),
    "grid": (grid_centers, 0.05),
}


def mode_weights(n_modes: int, weight_std: float = 0.0, seed: int = 0) -> Tensor:
    """Uniform weights, or (``weight_std > 0``) ``1/M + weight_std * N(0, 1)`` per mode, clipped and renormalised.

    This mirrors the PyTorch port's ``prior_std``; the draw depends only on ``seed`` so every run with the same
    dataset flags sees the same target distribution.
    """
    if weight_std < 0:
        raise ValueError(f"weight_std must be >= 0, got {weight_std}")
    uniform = torch.full((n_modes,), 1.0 / n_modes, dtype=torch.float64)
    if weight_std == 0:
        return uniform.float()
    gen = torch.Generator().manual_seed(seed)
    raw = uniform + weight_std * torch.randn(n_modes, generator=gen, dtype=torch.float64)
    # A small floor keeps every mode present, so reverse KL against the weights stays finite.
    raw = raw.clamp_min(0.1 / n_modes)
    return (raw / raw.sum()).float()


def make_mixture(name: str, weight_std: float = 0.0, weight_seed: int = 0,
                 std: Optional[float] = None) -> Mixture:
    """The named dataset of :data:`DATASETS`; ``std`` overrides the per-mode standard deviation."""
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    centers_fn, default_std = _SPECS[name]
    centers = centers_fn()
    return Mixture(name=name, centers=centers, std=default_std if std is None else float(std),
                   weights=mode_weights(centers.shape[0], weight_std, weight_seed))
