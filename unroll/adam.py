"""Adam (Kingma & Ba, 2015), AMSGrad and decoupled weight decay, exactly as :class:`torch.optim.Adam`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_adam_hyperparameters
from ._math import adam_moments, safe_sqrt, signed_decayed, step_number
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def adam(lr: Scalar = 1e-3, betas: Tuple[Scalar, Scalar] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: Scalar = 0.0, amsgrad: bool = False, maximize: bool = False,
         decoupled_weight_decay: bool = False) -> Optimizer:
    r"""Adam with L2 or decoupled weight decay and optional AMSGrad; the update of :class:`torch.optim.Adam`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \hat v_t = \max(\hat v_{t-1}, v_t)\ \text{(AMSGrad) or}\ v_t,

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}.

    With ``decoupled_weight_decay=True`` (torch.optim.Adam's option since torch 2.5; :func:`unroll.adamw`), the
    decay is not part of :math:`g_t` but shrinks the parameter first, :math:`\theta_{t-1} \leftarrow
    (1-\eta\lambda)\,\theta_{t-1}` (Loshchilov & Hutter, ICLR 2019).

    Metz et al. (2017) unroll this optimizer for the discriminator (Sec. 2.2, App. A). :math:`\sqrt{\cdot}` has a
    zero derivative at 0 here (see :func:`unroll._math.safe_sqrt`), so zero gradient entries give finite
    meta-gradients; forward values are those of torch.optim.
    """
    beta1, beta2 = check_adam_hyperparameters(lr, betas, eps, weight_decay)
    hyperparams = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                       maximize=maximize, decoupled_weight_decay=decoupled_weight_decay)
    return from_rule("adam", _update, hyperparams,
                     ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()))


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            betas: Tuple[Scalar, Scalar], eps: float, weight_decay: Scalar, amsgrad: bool, maximize: bool,
            decoupled_weight_decay: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    beta1, beta2 = betas
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                 decoupled=decoupled_weight_decay)
    exp_avg, exp_avg_sq = adam_moments(buffers["exp_avg"], buffers["exp_avg_sq"], grad, beta1, beta2)
    new_buffers = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        exp_avg_sq = new_buffers["max_exp_avg_sq"] = torch.maximum(buffers["max_exp_avg_sq"], exp_avg_sq)
    t = step_number(step)
    bias_correction2_sqrt = ((1 - beta2 ** t) ** 0.5).to(param.dtype)
    step_size = (lr / (1 - beta1 ** t)).to(param.dtype)
    denom = safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    return param + (-step_size) * exp_avg / denom, new_buffers
