"""Adagrad (Duchi, Hazan & Singer, 2011), exactly as :class:`torch.optim.Adagrad`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_hyperparameter
from ._math import safe_sqrt, signed_decayed, step_number
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def adagrad(lr: Scalar = 1e-2, lr_decay: float = 0.0, weight_decay: Scalar = 0.0,
            initial_accumulator_value: float = 0.0, eps: float = 1e-10, maximize: bool = False) -> Optimizer:
    r"""Adagrad with learning-rate decay and L2 weight decay; the update of :class:`torch.optim.Adagrad`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``) and
    :math:`s_0` = ``initial_accumulator_value``:

    .. math::
        \tilde\eta_t = \frac{\eta}{1 + (t-1)\,\delta},\quad s_t = s_{t-1} + g_t^2,\quad
        \theta_t = \theta_{t-1} - \tilde\eta_t\, \frac{g_t}{\sqrt{s_t} + \epsilon}

    (:math:`\delta` = ``lr_decay``). Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 2011. The state buffer is torch.optim's ``sum``; :math:`\sqrt{\cdot}` has a zero
    derivative at 0 (see :func:`unroll._math.safe_sqrt`), so zero gradient entries give finite meta-gradients.
    """
    check_hyperparameter(lr, "learning rate")
    check_hyperparameter(lr_decay, "lr_decay value")
    check_hyperparameter(weight_decay, "weight_decay value")
    check_hyperparameter(initial_accumulator_value, "initial_accumulator_value value")
    check_hyperparameter(eps, "epsilon value")
    hyperparams = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                       initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize)
    return from_rule("adagrad", _update, hyperparams, ("sum",), initial_values={"sum": initial_accumulator_value})


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            lr_decay: float, weight_decay: Scalar, initial_accumulator_value: Scalar, eps: float,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    # initial_accumulator_value is where `sum` starts (init's business); the step does not read it.
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize)
    decayed_lr = (lr / (1 + (step_number(step) - 1) * lr_decay)).to(param.dtype)
    state_sum = torch.addcmul(buffers["sum"], grad, grad)
    return param + (-decayed_lr) * grad / (safe_sqrt(state_sum) + eps), {"sum": state_sum}
