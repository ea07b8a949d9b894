"""The pure optimizer type shared by :func:`unroll.sgd`, :func:`unroll.adam` and :func:`unroll.rmsprop`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

import torch
from torch import Tensor

from ._checks import check_same_keys, check_shapes, check_tensor_mapping
from ._types import Grads, Params, State

TensorUpdate = Callable[[Tensor, Tensor, Dict[str, Tensor], Tensor], Tuple[Tensor, Dict[str, Tensor]]]
"""``update(param, grad, buffers, step) -> (new_param, new_buffers)`` for one tensor; ``step`` is the number
of steps taken before this one (a 0-dim tensor)."""


def _step_dtype() -> torch.dtype:
    # torch.optim keeps its step counters in this dtype (float32 unless the default dtype is float64).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


@dataclass(frozen=True)
class Optimizer:
    """A pure, differentiable optimizer: ``state = opt.init(params)``, ``params, state = opt.step(params, grads, state)``.

    Nothing is mutated: ``step`` returns new tensors, built from differentiable operations only, so gradients
    flow to ``params``, ``grads``, ``state`` and tensor-valued hyperparameters, and the whole step composes with
    ``torch.func.grad`` and ``torch.func.vmap``.

    The state is a plain dict: ``{"step": 0-dim tensor, <buffer>: {param name: tensor}, ...}`` with torch.optim's
    buffer names (e.g. ``exp_avg``), so it can be inspected, stacked for ``vmap`` and saved with ``torch.save``.
    """

    name: str
    hyperparams: Mapping[str, Any]
    buffers: Tuple[str, ...]
    update: TensorUpdate = field(repr=False)
    packable: bool = field(default=True, repr=False)
    """True when ``update`` is elementwise with one set of hyperparameters for every tensor, so an unroll may run
    it once on all parameters concatenated into one vector (see ``unroll._flat``); False keeps tensors apart."""

    def init(self, params: Params) -> State:
        """Fresh state for ``params``: step 0 and zero buffers (what torch.optim creates on its first step)."""
        check_tensor_mapping(params, "params", floating=True)
        first = next(iter(params.values()))
        state: State = {"step": torch.zeros((), dtype=_step_dtype(), device=first.device)}
        for buffer in self.buffers:
            state[buffer] = {name: torch.zeros_like(p, memory_format=torch.preserve_format)
                             for name, p in params.items()}
        return state

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

    def check_state(self, params: Params, state: State) -> None:
        """Raise a clear error if ``state`` is not a state of this optimizer for ``params``."""
        check_tensor_mapping(params, "params", floating=True)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be the dict returned by {self.name}.init, got {type(state).__name__}")
        check_same_keys(("step",) + self.buffers, state, f"{self.name} state", "the expected state entries")
        if not isinstance(state["step"], Tensor):
            raise TypeError(f"state['step'] must be a tensor, got {type(state['step']).__name__}")
        for buffer in self.buffers:
            check_tensor_mapping(state[buffer], f"state[{buffer!r}]", floating=True)
            check_same_keys(params, state[buffer], f"state[{buffer!r}]")
            check_shapes(params, state[buffer], f"state[{buffer!r}]")

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
