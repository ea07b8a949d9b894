"""Your own optimizer: an :class:`~unroll.Optimizer` from a per-tensor update rule."""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

from torch import Tensor

from .optimizer import Optimizer, TensorOptimizer

UpdateRule = Callable[..., Tuple[Tensor, Dict[str, Tensor]]]
"""``rule(param, grad, buffers, step, **hyperparams) -> (new_param, new_buffers)`` for one tensor."""


def custom_optimizer(rule: UpdateRule, *, name: str, elementwise: bool, buffers: Sequence[str] = (),
                     **hyperparams: Any) -> Optimizer:
    """An :class:`~unroll.Optimizer` that applies ``rule`` to every parameter tensor.

    ``rule(param, grad, buffers, step, **hyperparams) -> (new_param, new_buffers)`` gets one parameter, its
    gradient, its buffers ``{name: tensor}`` (zeros at step 0, shaped like the parameter) and ``step``, the number
    of steps taken before this one (a 0-dim float tensor), and returns the new parameter and every buffer.
    Write it with out-of-place differentiable operations only (``a * b``, ``torch.lerp``, ``torch.where``; no
    ``add_``): the unroll then differentiates through it, and it works under ``torch.func.grad`` and ``vmap``.
    Hyperparameters may be tensors that require grad (a learned learning rate).

    ``elementwise`` must say whether the rule treats every entry on its own (Adam, Lion, sign-SGD: True) or looks
    at whole tensors (a norm, a mean, a matrix product: False). Elementwise rules run once per unrolled step on
    all parameters concatenated into one vector (a few kernels per step instead of a few per tensor); a rule that
    is not elementwise would then see the concatenation, so it must be declared False.

    The state is ``{"step": tensor, <buffer>: {param name: tensor}}`` like the built-in optimizers'. Every call
    checks what ``rule`` returns (a tensor of the parameter's shape and dtype, and exactly ``buffers``), so a
    slip in the rule gives an error naming it.

    Example, sign-SGD (Bernstein et al., 2018):  ``custom_optimizer(lambda p, g, b, t, lr: (p - lr * g.sign(), {}),
    name="sign_sgd", elementwise=True, lr=0.01)``.
    """
    if not callable(rule):
        raise TypeError(f"custom_optimizer: rule must be callable, got {type(rule).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"custom_optimizer: name must be a non-empty str, got {name!r}")
    if not isinstance(elementwise, bool):
        raise TypeError(f"custom_optimizer: elementwise must be True or False, got {elementwise!r}")
    if isinstance(buffers, str) or not all(isinstance(b, str) for b in buffers):
        raise TypeError(f"custom_optimizer: buffers must be a sequence of buffer names, e.g. ('exp_avg',), "
                        f"got {buffers!r}")
    buffers = tuple(buffers)
    if len(set(buffers)) != len(buffers) or "step" in buffers:
        raise ValueError(f"custom_optimizer: buffer names must be distinct and not 'step' (the state's step count), "
                         f"got {buffers}")
    update = functools.partial(_checked_update, rule=rule, name=name, buffer_names=buffers,
                               hyperparams=hyperparams)
    return TensorOptimizer(name=name, hyperparams=dict(hyperparams), buffers=buffers, update=update,
                     packable=elementwise)


def _checked_update(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, rule: UpdateRule,
                    name: str, buffer_names: Tuple[str, ...],
                    hyperparams: Mapping[str, Any]) -> Tuple[Tensor, Dict[str, Tensor]]:
    result = rule(param, grad, buffers, step, **hyperparams)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{name}: the update rule must return (new_param, new_buffers), got {type(result).__name__}")
    new_param, new_buffers = result
    _check_like(new_param, param, f"{name}: the update rule's new parameter")
    if not isinstance(new_buffers, Mapping) or set(new_buffers) != set(buffer_names):
        got = sorted(new_buffers) if isinstance(new_buffers, Mapping) else type(new_buffers).__name__
        raise KeyError(f"{name}: the update rule must return the buffers {sorted(buffer_names)}, got {got}")
    for buffer in buffer_names:
        _check_like(new_buffers[buffer], param, f"{name}: the update rule's buffer {buffer!r}")
    return new_param, dict(new_buffers)


def _check_like(value: Any, param: Tensor, what: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(value).__name__}")
    if value.shape != param.shape or value.dtype != param.dtype:
        raise ValueError(f"{what} has shape {tuple(value.shape)} and dtype {value.dtype}; the parameter has shape "
                         f"{tuple(param.shape)} and dtype {param.dtype}")
