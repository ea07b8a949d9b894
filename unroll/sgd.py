"""Stochastic gradient descent with momentum, exactly as :class:`torch.optim.SGD`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_hyperparameter
from ._math import is_zero, signed_decayed
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def sgd(lr: Scalar, momentum: float = 0.0, dampening: float = 0.0, weight_decay: Scalar = 0.0,
        nesterov: bool = False, maximize: bool = False) -> Optimizer:
    r"""SGD with optional (Nesterov) momentum and L2 weight decay; the update of :class:`torch.optim.SGD`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``):

    .. math::
        b_1 = g_1,\quad b_t = \mu b_{t-1} + (1-\tau) g_t,\quad
        d_t = g_t + \mu b_t \ \text{(Nesterov)}\ \text{or}\ b_t,\quad
        \theta_t = \theta_{t-1} - \eta\, d_t .

    Without momentum, :math:`d_t = g_t`: the update of Eq. 7 of Metz et al. (2017) (with ``maximize=True`` for
    the discriminator's ascent). Unlike ``torch.optim.SGD(differentiable=True)``, the first momentum buffer
    :math:`b_1 = g_1` stays attached to the graph, and NaN hyperparameters are rejected (torch.optim.SGD,
    unlike its other optimizers, accepts them).
    """
    check_hyperparameter(lr, "learning rate")
    check_hyperparameter(momentum, "momentum value")
    check_hyperparameter(weight_decay, "weight_decay value")
    check_hyperparameter(dampening, "dampening value", low=None)  # torch.optim lets any dampening through
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    hyperparams = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                       maximize=maximize)
    return from_rule("sgd", _update, hyperparams, () if is_zero(momentum) else ("momentum_buffer",))


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            momentum: float, dampening: float, weight_decay: Scalar, nesterov: bool,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize)
    new_buffers = {}
    if not is_zero(momentum):
        decayed = buffers["momentum_buffer"] * momentum + (1 - dampening) * grad
        # torch.optim starts the buffer at the first gradient itself (no dampening on step 1).
        buffer = torch.where(step == 0, grad, decayed)
        new_buffers["momentum_buffer"] = buffer
        grad = grad + momentum * buffer if nesterov else buffer
    return param + (-lr) * grad, new_buffers
