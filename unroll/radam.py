"""RAdam (Liu et al., 2020): Adam with a rectified adaptive learning rate, exactly as :class:`torch.optim.RAdam`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_adam_hyperparameters
from ._math import adam_moments, safe_sqrt, signed_decayed, step_number
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def radam(lr: Scalar = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: Scalar = 0.0, decoupled_weight_decay: bool = False, maximize: bool = False) -> Optimizer:
    r"""RAdam with L2 or decoupled weight decay; the update of :class:`torch.optim.RAdam`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``; with
    ``decoupled_weight_decay`` instead :math:`\theta_{t-1} \leftarrow (1-\eta\lambda)\theta_{t-1}`, as AdamW) and
    :math:`m_t, v_t` as in :func:`unroll.adam`:

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\quad \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\quad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},

        \theta_t = \theta_{t-1} - \frac{\eta\, m_t}{1-\beta_1^t} \cdot
        \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\ 1 & \text{otherwise.}
        \end{cases}

    Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020. The branch is a
    ``torch.where`` on the step, so a batched step count works under ``torch.func.vmap``; both branches are
    finite and :math:`\sqrt{\cdot}` has a zero derivative at 0 (see :func:`unroll._math.safe_sqrt`), so gradients
    stay finite on either side and at zero gradient entries. State buffers: ``exp_avg``, ``exp_avg_sq``.
    """
    beta1, beta2 = check_adam_hyperparameters(lr, betas, eps, weight_decay)
    hyperparams = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                       decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    return from_rule("radam", _update, hyperparams, ("exp_avg", "exp_avg_sq"))


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            betas: Tuple[float, float], eps: float, weight_decay: Scalar, decoupled_weight_decay: bool,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    beta1, beta2 = betas
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                 decoupled=decoupled_weight_decay)
    exp_avg, exp_avg_sq = adam_moments(buffers["exp_avg"], buffers["exp_avg_sq"], grad, beta1, beta2)
    t = step_number(step)
    bias_correction1 = (1 - beta1 ** t).to(param.dtype)
    bias_correction2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2 ** t / bias_correction2
    rectify = rho_t > 5.0
    # Both factors are 1 off the rectified branch, so r_t (unused there) is finite with a finite derivative.
    numerator = torch.where(rectify, (rho_t - 4) * (rho_t - 2) * rho_inf, 1.0)
    denominator = torch.where(rectify, (rho_inf - 4) * (rho_inf - 2) * rho_t, 1.0)
    rect = ((numerator / denominator) ** 0.5).to(param.dtype)
    adaptive_lr = (safe_sqrt(exp_avg_sq) + eps).reciprocal() * (bias_correction2 ** 0.5).to(param.dtype)
    bias_corrected_step = exp_avg / bias_correction1 * lr
    update = torch.where(rectify, bias_corrected_step * adaptive_lr * rect, bias_corrected_step)
    return param - update, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
