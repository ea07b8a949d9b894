"""Adam (Kingma & Ba, 2015) and AMSGrad, exactly as :class:`torch.optim.Adam`."""

from __future__ import annotations

import functools
from typing import Dict, Tuple

import torch
from torch import Tensor

from ._checks import check_hyperparameter
from ._math import is_zero, safe_sqrt
from ._types import Scalar
from .optimizer import Optimizer


def adam(lr: Scalar = 1e-3, betas: Tuple[Scalar, Scalar] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: Scalar = 0.0, amsgrad: bool = False, maximize: bool = False) -> Optimizer:
    r"""Adam with L2 weight decay and optional AMSGrad; the update of :class:`torch.optim.Adam`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \hat v_t = \max(\hat v_{t-1}, v_t)\ \text{(AMSGrad) or}\ v_t,

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}.

    Metz et al. (2017) unroll this optimizer for the discriminator (Sec. 2.2, App. A). :math:`\sqrt{\cdot}` has a
    zero derivative at 0 here (see :func:`unroll._math.safe_sqrt`), so zero gradient entries give finite
    meta-gradients; forward values are those of torch.optim.
    """
    beta1, beta2 = betas
    check_hyperparameter(lr, "learning rate")
    check_hyperparameter(eps, "epsilon value")
    check_hyperparameter(beta1, "beta parameter at index 0", high=1.0)
    check_hyperparameter(beta2, "beta parameter at index 1", high=1.0)
    check_hyperparameter(weight_decay, "weight_decay")
    update = functools.partial(_update, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                               amsgrad=amsgrad, maximize=maximize)
    return Optimizer(
        name="adam",
        hyperparams=dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize),
        buffers=("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()),
        update=update,
    )


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar, beta1: Scalar,
            beta2: Scalar, eps: float, weight_decay: Scalar, amsgrad: bool,
            maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    if maximize:
        grad = -grad
    if not is_zero(weight_decay):
        grad = grad + weight_decay * param
    exp_avg = torch.lerp(buffers["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = buffers["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
    new_buffers = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if amsgrad:
        exp_avg_sq = new_buffers["max_exp_avg_sq"] = torch.maximum(buffers["max_exp_avg_sq"], exp_avg_sq)
    # Bias corrections in float64, as torch.optim computes them with Python floats, then rounded to the
    # parameter's dtype as torch.optim's kernels do (0-dim parameters would otherwise be promoted to float64).
    t = (step + 1).to(torch.float64)
    bias_correction1 = 1 - beta1 ** t
    bias_correction2_sqrt = ((1 - beta2 ** t) ** 0.5).to(param.dtype)
    step_size = (lr / bias_correction1).to(param.dtype)
    denom = safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    return param + (-step_size) * exp_avg / denom, new_buffers
