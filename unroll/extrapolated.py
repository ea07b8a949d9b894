"""The one-step extrapolation of the unrolled gradient that the Discussion of Metz et al. (2017) suggests."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Union

from torch import Tensor

from .optimizer import Optimizer
from .unrolled import LossFn, surrogate_loss

_FIXED_OPTIONS = ("K", "average_over_steps")


def extrapolated_surrogate_loss(inner_fn: LossFn, alpha: Union[float, Tensor], *, optimizer: Optimizer,
                                **options: Any) -> Callable[..., Tensor]:
    r"""Return ``surrogate(params, state, *args, **call_options) -> value``, extrapolating one unrolled step.

    .. math::
        f_\alpha = f_0 + \alpha\,(f_1 - f_0), \qquad
        \nabla_{\theta_G} f_\alpha = g_0 + \alpha\,(g_1 - g_0)

    where :math:`f_K` is :func:`unroll.surrogate_loss`'s value with K unrolled steps (Eq. 9 of Metz, Poole, Pfau
    & Sohl-Dickstein, "Unrolled Generative Adversarial Networks", ICLR 2017) and :math:`g_K` its gradient with
    respect to the outer player (Eq. 12): :math:`g_0` is the plain training gradient and :math:`g_1` the one-step
    unrolled gradient. The paper's Discussion (Sec. 4) reports "initial positive results suggesting it may be
    sufficient to further perturb the training gradient in the same direction that a single unrolling step
    perturbs it": :math:`\alpha > 1` goes further along :math:`g_1 - g_0` at the cost of one unrolled step.
    ``alpha = 0`` is the plain loss, ``alpha = 1`` the one-step surrogate.

    When both losses are linear in the inner parameters (a bilinear game :math:`x^\top A y`) and the inner
    optimizer is plain SGD, the inner gradient is constant along the unroll, :math:`\theta^K = \theta - K\eta\nabla`,
    :math:`f_K - f_0` is linear in K, and ``alpha = K`` reproduces K unrolled steps exactly. Elsewhere it is a
    first-order guess.

    Args:
        inner_fn: the loss the inner player minimises, as in :func:`unroll.surrogate_loss`.
        alpha: the extrapolation factor, a finite real number or a 0-dim tensor (which may require grad).
        optimizer: the inner player's optimizer.
        **options: any other keyword of :func:`unroll.surrogate_loss` (``outer_fn``, ``stop_grad``,
            ``step_args``, ``check_finite``, ``transform_grads``, ...), passed to both :math:`f_0` and :math:`f_1`;
            not ``K`` or ``average_over_steps``.

    The returned ``surrogate`` takes the arguments of :func:`unroll.surrogate_loss`'s (``buffers=``,
    ``outer_args=``). Cost: one unrolled step plus one more evaluation of ``outer_fn`` (at :math:`\theta^0`).
    """
    _check_alpha(alpha)
    fixed = [name for name in _FIXED_OPTIONS if name in options]
    if fixed:
        raise TypeError(f"extrapolated_surrogate_loss fixes {fixed} (it combines K = 0 and K = 1); remove them")
    plain = surrogate_loss(inner_fn, 0, optimizer=optimizer, **options)
    one_step = surrogate_loss(inner_fn, 1, optimizer=optimizer, **options)

    def surrogate(params: Any, state: Any, *args: Any, **call_options: Any) -> Tensor:
        f_0 = plain(params, state, *args, **call_options)
        f_1 = one_step(params, state, *args, **call_options)
        return f_0 + alpha * (f_1 - f_0)

    return surrogate


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, Tensor):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a 0-dim floating-point tensor, got shape {tuple(alpha.shape)} and "
                             f"dtype {alpha.dtype}")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number or a 0-dim tensor, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
