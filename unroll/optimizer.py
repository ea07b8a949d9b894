"""The optimizer protocol, and the per-tensor rule optimizer that :func:`unroll.sgd`, :func:`unroll.adam` and the
rest return."""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ._checks import (
    check_beside_params,
    check_like_params,
    check_same_keys,
    check_scalars,
    check_shapes,
    check_step_count,
    check_tensor_hyperparameters,
    check_tensor_mapping,
)
from ._types import Grads, Params, Scalar, State

TensorUpdate = Callable[[Tensor, Tensor, Dict[str, Tensor], Tensor], Tuple[Tensor, Dict[str, Tensor]]]
"""``update(param, grad, buffers, step) -> (new_param, new_buffers)`` for one tensor; ``step`` is the number
of steps taken before this one (a 0-dim tensor)."""


def step_dtype() -> torch.dtype:
    """The dtype torch.optim keeps its step counters in: float32 unless the default dtype is float64."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Optimizer(abc.ABC):
    """A pure, differentiable optimizer: ``state = opt.init(params)``,
    ``params, state = opt.step(params, grads, state)``.

    Nothing is mutated: ``step`` returns new tensors, built from differentiable operations only, so gradients
    flow to ``params``, ``grads``, ``state`` and tensor-valued hyperparameters, and the whole step composes with
    ``torch.func.grad`` and ``torch.func.vmap``.

    The state is a plain dict: ``{"step": 0-dim tensor, <buffer>: {param name: tensor}, ...}`` with torch.optim's
    buffer names (e.g. ``exp_avg``), so it can be inspected, stacked for ``vmap`` and saved with ``torch.save``.
    Each buffer holds a tensor shaped like its parameter, or, for the names in ``scalar_buffers``, a 0-dim tensor
    per parameter.

    This is the protocol every optimizer follows (``name``, ``hyperparams``, ``buffers``, ``packable``,
    ``scalar_buffers``, ``init``, ``check_state``, ``apply``; ``step`` and ``check`` are built on them). It has two
    kinds: a :class:`TensorOptimizer` applies one per-tensor update rule to every parameter (what
    :func:`unroll.sgd`, :func:`unroll.adam`, ... and :func:`unroll.custom_optimizer` return), and
    :func:`unroll.param_groups` gives each parameter its own optimizer. Calling ``unroll.Optimizer(name=...,
    hyperparams=..., buffers=..., update=...)`` builds a :class:`TensorOptimizer`, as ``pathlib.Path(...)`` builds
    the path class of the platform.
    """

    name: str
    hyperparams: Mapping[str, Any]
    buffers: Tuple[str, ...]
    packable: bool
    """True when the update is elementwise with one set of hyperparameters for every tensor, so an unroll may run
    it once on all parameters concatenated into one vector (see ``unroll._flat``); False keeps tensors apart."""
    scalar_buffers: Tuple[str, ...]
    """Buffers holding one 0-dim tensor per parameter in the step counter's dtype (NAdam's ``mu_product``)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Optimizer:
        return super().__new__(TensorOptimizer if cls is Optimizer else cls)

    @abc.abstractmethod
    def init(self, params: Params) -> State:
        """Fresh state for ``params``: what torch.optim creates on its first step."""

    @abc.abstractmethod
    def check_state(self, params: Params, state: State) -> None:
        """Raise a clear error if ``state`` is not a state of this optimizer for ``params``."""

    @abc.abstractmethod
    def apply(self, params: Params, grads: Grads, state: State) -> Tuple[Dict[str, Tensor], State]:
        """:meth:`step` without the input checks, for hot loops that checked their inputs once."""

    def step(self, params: Params, grads: Grads, state: State) -> Tuple[Dict[str, Tensor], State]:
        """One optimizer step. Returns ``(new_params, new_state)``; the inputs are left untouched."""
        self.check(params, grads, state)
        return self.apply(params, grads, state)

    def check(self, params: Params, grads: Grads, state: State) -> None:
        """Raise a clear error if ``params``, ``grads`` or ``state`` do not fit together."""
        self.check_state(params, state)
        check_tensor_mapping(grads, "grads", floating=True)
        check_same_keys(params, grads, "grads")
        check_shapes(params, grads, "grads")
        check_like_params(params, grads, "grads")


@dataclass(frozen=True)
class TensorOptimizer(Optimizer):
    """An optimizer made of one per-tensor update rule, ``update(param, grad, buffers, step)``, with its
    hyperparameters bound: each parameter is stepped on its own (or, when ``packable``, all of them at once as one
    vector)."""

    name: str
    hyperparams: Mapping[str, Any]
    buffers: Tuple[str, ...]
    update: TensorUpdate = field(repr=False)
    packable: bool = field(default=True, repr=False)
    initial_values: Mapping[str, Scalar] = field(default_factory=dict, repr=False)
    """The value ``init`` fills each named buffer with (e.g. Adagrad's ``initial_accumulator_value``); buffers not
    named here start at zero, as torch.optim's do."""
    scalar_buffers: Tuple[str, ...] = field(default=(), repr=False)
    """Buffers holding one 0-dim tensor per parameter in the step counter's dtype (NAdam's ``mu_product``), as
    torch.optim keeps them, instead of a tensor shaped like the parameter. They cannot be packed into one vector
    with the parameters, so an optimizer with any must have ``packable=False``."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.initial_values) - set(self.buffers)) + sorted(set(self.scalar_buffers)
                                                                                 - set(self.buffers))
        if unknown:
            raise ValueError(f"{self.name}: initial_values and scalar_buffers may only name buffers "
                             f"{list(self.buffers)}, got {unknown}")
        if self.scalar_buffers and self.packable:
            raise ValueError(f"{self.name}: scalar buffers {list(self.scalar_buffers)} cannot be packed with the "
                             f"parameters; pass packable=False")

    def init(self, params: Params) -> State:
        """Fresh state for ``params``: step 0 and buffers at their initial values (zero unless ``initial_values``
        says otherwise), what torch.optim creates on its first step."""
        check_tensor_mapping(params, "params", floating=True)
        first = next(iter(params.values()))
        state: State = {"step": torch.zeros((), dtype=step_dtype(), device=first.device)}
        for buffer in self.buffers:
            value = self.initial_values.get(buffer, 0.0)
            state[buffer] = {name: self._initial_buffer(buffer, p, value) for name, p in params.items()}
        return state

    def _initial_buffer(self, buffer: str, param: Tensor, value: Scalar) -> Tensor:
        if buffer in self.scalar_buffers:
            like = torch.zeros((), dtype=step_dtype(), device=param.device)
        else:
            like = torch.zeros_like(param, memory_format=torch.preserve_format)
        if isinstance(value, Tensor):  # a tensor initial value stays differentiable
            return like + value.to(dtype=like.dtype, device=like.device)
        return like.fill_(value)

    def check_state(self, params: Params, state: State) -> None:
        """Raise a clear error if ``state`` is not a state of this optimizer for ``params``: its entries, names and
        shapes, buffers in their parameter's dtype and on its device, tensor hyperparameters in the params' dtype
        and beside them, and a step count that is a whole number >= 0 (one host read of it, skipped under vmap)."""
        check_tensor_mapping(params, "params", floating=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the dict returned by {self.name}.init, got {type(state).__name__}")
        check_same_keys(("step",) + self.buffers, state, f"{self.name} state", "the expected state entries")
        if not isinstance(state["step"], Tensor):
            raise TypeError(f"state['step'] must be a tensor, got {type(state['step']).__name__}")
        for buffer in self.buffers:
            check_tensor_mapping(state[buffer], f"state[{buffer!r}]", floating=True)
            check_same_keys(params, state[buffer], f"state[{buffer!r}]")
            if buffer in self.scalar_buffers:
                # Kept in the step count's dtype, and on the CPU by torch.optim (NAdam's mu_product), as the step.
                check_scalars(state[buffer], f"state[{buffer!r}]")
                for name, value in state[buffer].items():
                    check_beside_params(value, f"state[{buffer!r}][{name!r}]", params)
            else:
                check_shapes(params, state[buffer], f"state[{buffer!r}]")
                check_like_params(params, state[buffer], f"state[{buffer!r}]")
        # The step count's dtype follows torch.optim's rule (float32 unless the default dtype is float64) whatever
        # the params' dtype, so only its device and value are checked.
        check_beside_params(state["step"], "state['step']", params)
        check_tensor_hyperparameters(self.hyperparams, params, self.name)
        check_step_count(state["step"])

    def apply(self, params: Params, grads: Grads, state: State) -> Tuple[Dict[str, Tensor], State]:
        """:meth:`step` without the input checks, for hot loops that checked their inputs once."""
        step = state["step"]
        new_params: Dict[str, Tensor] = {}
        new_state: State = {"step": step + 1}
        for buffer in self.buffers:
            new_state[buffer] = {}
        for name, param in params.items():
            buffers = {buffer: state[buffer][name] for buffer in self.buffers}
            new_params[name], new_buffers = self.update(param, grads[name], buffers, step)
            for buffer in self.buffers:
                new_state[buffer][name] = new_buffers[buffer]
        return new_params, new_state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"unroll.{self.name}({args})"


def from_rule(name: str, rule: Callable[..., Tuple[Tensor, Dict[str, Tensor]]], hyperparams: Dict[str, Any],
              buffers: Tuple[str, ...], **options: Any) -> TensorOptimizer:
    """The :class:`TensorOptimizer` whose update is ``rule(param, grad, buffers, step, **hyperparams)``: a factory
    lists its hyperparameters once, for the rule and for ``opt.hyperparams`` alike. ``options``: the other fields
    (``packable``, ``initial_values``, ``scalar_buffers``)."""
    return TensorOptimizer(name=name, hyperparams=hyperparams, buffers=buffers,
                           update=functools.partial(rule, **hyperparams), **options)
