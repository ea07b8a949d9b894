"""Numerical helpers shared by the optimizers."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._types import Scalar


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


def step_number(step: Tensor) -> Tensor:
    """``t = step + 1``, the number of the step being taken, in float64: torch.optim computes its step-dependent
    factors (bias corrections, schedules) with Python floats. Round results to the parameter's dtype before
    combining them with it, as torch.optim's kernels do (0-dim parameters would otherwise become float64)."""
    return (step + 1).to(torch.float64)


def signed_decayed(param: Tensor, grad: Tensor, *, lr: Scalar, weight_decay: Scalar, maximize: bool,
                   decoupled: bool = False) -> Tuple[Tensor, Tensor]:
    r"""``(param, g)`` as every torch.optim update starts: :math:`g = \pm\nabla` (minus when ``maximize``) plus
    the L2 term :math:`\lambda\theta`, or, with ``decoupled`` weight decay (Loshchilov & Hutter, "Decoupled
    Weight Decay Regularization", ICLR 2019), :math:`\theta \leftarrow \theta(1 - \eta\lambda)` and ``g`` left
    alone."""
    if maximize:
        grad = -grad
    if not is_zero(weight_decay):
        if decoupled:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    return param, grad


def adam_moments(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: Scalar,
                 beta2: Scalar) -> Tuple[Tensor, Tensor]:
    r""":math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\ v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`, with
    torch.optim's operations (a lerp for :math:`m`)."""
    return torch.lerp(exp_avg, grad, 1 - beta1), exp_avg_sq * beta2 + (1 - beta2) * grad * grad
