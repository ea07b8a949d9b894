"""Adamax (Kingma & Ba, 2015, Sec. 7.1), Adam's infinity-norm variant, exactly as :class:`torch.optim.Adamax`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_adam_hyperparameters
from ._math import signed_decayed, step_number
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def adamax(lr: Scalar = 2e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: Scalar = 0.0, maximize: bool = False) -> Optimizer:
    r"""Adamax with L2 weight decay; the update of :class:`torch.optim.Adamax`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),\quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{u_t}.

    Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Sec. 7.1 (torch.optim adds
    :math:`\epsilon` inside the max). State buffers: ``exp_avg``, ``exp_inf``. :math:`|g|` has derivative 0 at 0
    and :math:`u_t \ge \epsilon`, so zero gradient entries give finite meta-gradients.
    """
    beta1, beta2 = check_adam_hyperparameters(lr, betas, eps, weight_decay)
    hyperparams = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, maximize=maximize)
    return from_rule("adamax", _update, hyperparams, ("exp_avg", "exp_inf"))


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            betas: Tuple[float, float], eps: float, weight_decay: Scalar,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    beta1, beta2 = betas
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize)
    exp_avg = torch.lerp(buffers["exp_avg"], grad, 1 - beta1)
    exp_inf = torch.maximum(buffers["exp_inf"] * beta2, grad.abs() + eps)
    step_size = (lr / (1 - beta1 ** step_number(step))).to(param.dtype)
    return param + (-step_size) * exp_avg / exp_inf, {"exp_avg": exp_avg, "exp_inf": exp_inf}
