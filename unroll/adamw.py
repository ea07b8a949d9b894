"""AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, exactly as :class:`torch.optim.AdamW`."""

from __future__ import annotations

import dataclasses
from typing import Tuple

from ._types import Scalar
from .adam import adam
from .optimizer import Optimizer, TensorOptimizer


def adamw(lr: Scalar = 1e-3, betas: Tuple[Scalar, Scalar] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: Scalar = 1e-2, amsgrad: bool = False, maximize: bool = False) -> Optimizer:
    r"""Adam whose weight decay shrinks the parameters instead of entering the gradient; :class:`torch.optim.AdamW`.

    With :math:`g_t = \pm\nabla_\theta f(\theta_{t-1})` (minus when ``maximize``) and :math:`m_t, v_t, \hat v_t`
    as in :func:`unroll.adam`:

    .. math::
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}.

    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019. This is
    ``unroll.adam(..., decoupled_weight_decay=True)`` (the same update), under AdamW's name and default
    ``weight_decay=1e-2``.
    """
    optimizer = adam(lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay=True)
    assert isinstance(optimizer, TensorOptimizer)  # adam's rule: renamed below, not rebuilt
    hyperparams = {k: v for k, v in optimizer.hyperparams.items() if k != "decoupled_weight_decay"}
    return dataclasses.replace(optimizer, name="adamw", hyperparams=hyperparams)
