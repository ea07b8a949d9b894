"""RMSProp (Tieleman & Hinton, 2012), plain or centered, exactly as :class:`torch.optim.RMSprop`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_hyperparameter
from ._math import is_zero, safe_sqrt, signed_decayed
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def rmsprop(lr: Scalar = 1e-2, alpha: Scalar = 0.99, eps: float = 1e-8, weight_decay: Scalar = 0.0,
            momentum: Scalar = 0.0, centered: bool = False, maximize: bool = False) -> Optimizer:
    r"""RMSProp with optional centering, momentum and L2 weight decay; the update of :class:`torch.optim.RMSprop`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``):

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\quad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t\ \text{(centered)},\quad
        s_t = \sqrt{v_t - \bar g_t^2}\ \text{(centered) or}\ \sqrt{v_t},

        b_t = \mu b_{t-1} + g_t / (s_t + \epsilon),\quad
        \theta_t = \theta_{t-1} - \eta\, b_t\ \ (\text{or}\ \eta\, g_t / (s_t + \epsilon)\ \text{when}\ \mu = 0).

    :math:`\sqrt{\cdot}` has a zero derivative at 0 here (see :func:`unroll._math.safe_sqrt`), so zero gradient
    entries give finite meta-gradients; forward values are those of torch.optim.
    """
    check_hyperparameter(lr, "learning rate")
    check_hyperparameter(eps, "epsilon value")
    check_hyperparameter(momentum, "momentum value")
    check_hyperparameter(weight_decay, "weight_decay value")
    check_hyperparameter(alpha, "alpha value")
    buffers: Tuple[str, ...] = ("square_avg",)
    if not is_zero(momentum):
        buffers += ("momentum_buffer",)
    if centered:
        buffers += ("grad_avg",)
    hyperparams = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                       maximize=maximize)
    return from_rule("rmsprop", _update, hyperparams, buffers)


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            alpha: Scalar, eps: float, weight_decay: Scalar, momentum: Scalar, centered: bool,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize)
    square_avg = buffers["square_avg"] * alpha + (1 - alpha) * grad * grad
    new_buffers = {"square_avg": square_avg}
    if centered:
        grad_avg = new_buffers["grad_avg"] = torch.lerp(buffers["grad_avg"], grad, 1 - alpha)
        avg = safe_sqrt(square_avg + (-1) * grad_avg * grad_avg)
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + eps
    if not is_zero(momentum):
        buffer = new_buffers["momentum_buffer"] = buffers["momentum_buffer"] * momentum + grad / avg
        return param + (-lr) * buffer, new_buffers
    return param + (-lr) * grad / avg, new_buffers
