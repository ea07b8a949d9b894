"""NAdam (Dozat, 2016): Adam with Nesterov momentum, exactly as :class:`torch.optim.NAdam`."""

from __future__ import annotations

from typing import Dict, Tuple

from torch import Tensor

from ._checks import check_adam_hyperparameters, check_hyperparameter
from ._math import adam_moments, safe_sqrt, signed_decayed, step_number
from ._types import Scalar
from .optimizer import Optimizer, from_rule


def nadam(lr: Scalar = 2e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: Scalar = 0.0, momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False,
          maximize: bool = False) -> Optimizer:
    r"""NAdam with L2 or decoupled weight decay; the update of :class:`torch.optim.NAdam`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1}) + \lambda\theta_{t-1}` (minus when ``maximize``; with
    ``decoupled_weight_decay`` instead :math:`\theta_{t-1} \leftarrow (1-\eta\lambda)\theta_{t-1}`, as AdamW),
    :math:`m_t, v_t` as in :func:`unroll.adam` and :math:`\psi` = ``momentum_decay``:

    .. math::
        \mu_t = \beta_1\left(1 - \tfrac12\, 0.96^{t\psi}\right),\quad \Pi_t = \prod_{i \le t} \mu_i,\quad
        \theta_t = \theta_{t-1} - \eta \left(\frac{1-\mu_t}{1-\Pi_t}\, g_t
                   + \frac{\mu_{t+1}}{1-\Pi_t\,\mu_{t+1}}\, m_t\right)
                   \Big/ \left(\sqrt{v_t/(1-\beta_2^t)} + \epsilon\right).

    Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop. The state keeps torch.optim's
    ``mu_product`` (:math:`\Pi_t`) as one 0-dim tensor per parameter in the step's dtype (float32, rounded there as
    torch.optim does), besides ``exp_avg`` and ``exp_avg_sq``. Because of that scalar buffer the optimizer is not
    ``packable``: an unroll steps each tensor separately instead of one concatenated vector.
    """
    beta1, beta2 = check_adam_hyperparameters(lr, betas, eps, weight_decay)
    check_hyperparameter(momentum_decay, "momentum_decay value")
    hyperparams = dict(lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay,
                       momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    return from_rule("nadam", _update, hyperparams, ("exp_avg", "exp_avg_sq", "mu_product"), packable=False,
                     initial_values={"mu_product": 1.0}, scalar_buffers=("mu_product",))


def _update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: Scalar,
            betas: Tuple[float, float], eps: float, weight_decay: Scalar, momentum_decay: float,
            decoupled_weight_decay: bool, maximize: bool) -> Tuple[Tensor, Dict[str, Tensor]]:
    beta1, beta2 = betas
    param, grad = signed_decayed(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                                 decoupled=decoupled_weight_decay)
    t = step_number(step)
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    # torch.optim multiplies its float32 mu_product by mu rounded to float32, then reads it back as a double.
    mu_product = buffers["mu_product"] * mu.to(buffers["mu_product"].dtype)
    exp_avg, exp_avg_sq = adam_moments(buffers["exp_avg"], buffers["exp_avg_sq"], grad, beta1, beta2)
    bias_correction2 = (1 - beta2 ** t).to(param.dtype)
    denom = safe_sqrt(exp_avg_sq / bias_correction2) + eps
    product = mu_product.to(t.dtype)
    grad_size = (-lr * (1.0 - mu) / (1.0 - product)).to(param.dtype)
    exp_avg_size = (-lr * mu_next / (1.0 - product * mu_next)).to(param.dtype)
    new_param = param + grad_size * grad / denom + exp_avg_size * exp_avg / denom
    return new_param, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "mu_product": mu_product}
