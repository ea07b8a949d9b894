"""Numerical helpers shared by the optimizers."""

from __future__ import annotations

import torch
from torch import Tensor


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with the same forward values, but a zero (not infinite) derivative where ``x == 0``.

    Adam's and RMSProp's denominators take ``sqrt(v)`` with ``v = g**2``-like running averages. When a
    gradient entry is exactly zero (a dead ReLU unit, an unused parameter) ``v == 0`` and the true
    derivative ``1 / (2 sqrt(v))`` is infinite; multiplied by ``dv/dg = 0`` it gives NaN meta-gradients.
    ``sqrt(g**2) = |g|`` has the subgradient 0 at 0, which is what we return. Negative inputs (only from
    rounding in centered RMSProp) give NaN exactly as ``torch.sqrt`` does, with no gradient.
    """
    positive = x > 0
    # Only positive entries reach the differentiable sqrt; the others take torch.sqrt's value (0 or NaN) from a
    # detached copy, so no gradient flows through them.
    root = torch.where(positive, x, torch.ones_like(x)).sqrt()
    return torch.where(positive, root, x.detach().sqrt())


def is_zero(value: float | Tensor) -> bool:
    """True for a Python number equal to 0; tensors are never treated as zero (they may require grad)."""
    return not isinstance(value, Tensor) and value == 0
