"""Checkpointed unrolling: the differentiated steps enter the graph as one node that stores at most N states.

The forward pass runs the steps recording no graph, stores the first state of each top-level segment of
:mod:`unroll._schedule`'s plan, and notes every tensor from outside the unroll that the steps use and that
requires grad (``args``, tensors that ``inner_fn``, ``step_args``, ``transform_grads`` or the outer loss close
over, tensor hyperparameters). One :class:`torch.autograd.Function` then joins the unroll to the graph: its
inputs are the first state and those tensors, its outputs the last state. Its backward pass reverses the steps
last to first: each step is run again from its state (recreated by advancing from the nearest stored one, as the
plan says) with its graph, differentiated, and its graph freed, so memory holds N states, the graph of one step,
and nothing that grows with K.

Gradients reach what the plain unroll's reach. A tensor that the steps use but that was not noticed (an
operation outside ``torch``'s Python API) would lose its gradient; every rerun step's graph is checked for
leaves outside the noted tensors, and one is an error, never a silent zero. The random number generators are
stored with each state and restored for every rerun, so dropout and ``torch.randn`` in the steps draw the same
numbers again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ._graph import foreign_leaf
from ._schedule import Segment, stored_positions

Step = Callable[[Any, int], Tuple[Any, Tensor]]
"""``step(carry, k) -> (carry, loss)``: unrolled step ``k``; it may not change its input ``carry``."""

Mask = Callable[[Any], List[bool]]
"""``differentiable(carry)``: for each tensor of the carry (in pytree order), whether gradients flow through it."""


class _RNGState:
    """The generators' state at one step: the CPU's, and each initialised CUDA device's."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]

    def restored(self) -> contextlib.AbstractContextManager[None]:
        """Run with the generators as they were here, leaving them as they are outside."""
        return _restored(self)


@contextlib.contextmanager
def _restored(rng: _RNGState) -> Iterator[None]:
    devices = list(range(len(rng.cuda))) if rng.cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(rng.cpu)
        if rng.cuda is not None:
            torch.cuda.set_rng_state_all(rng.cuda)
        yield


class _StoredState:
    """A carry kept for reruns, detached, with the generators' state that its step starts from."""

    def __init__(self, carry: Any, rng: _RNGState) -> None:
        leaves, self.spec = pytree.tree_flatten(carry)
        self.leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        self.rng = rng

    def differentiable(self, differentiable: Mask) -> Tuple[Any, List[Tensor]]:
        """The carry as fresh leaves (those ``differentiable`` marks require grad), and its tensors."""
        carry = self.carry()
        flags = iter(differentiable(carry))
        leaves = [t.detach().requires_grad_(next(flags)) if isinstance(t, Tensor) else t for t in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec), [t for t in leaves if isinstance(t, Tensor)]

    def carry(self) -> Any:
        return pytree.tree_unflatten(list(self.leaves), self.spec)


class _OutsideTensors(TorchFunctionMode):
    """Notes the tensors that require grad and that operations in a step take from outside it (not made in the
    step, not its carry)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Dict[int, Tensor] = {}
        self._inside: Dict[int, Tensor] = {}

    def start_step(self, carry: Any) -> None:
        self._inside = {id(t): t for t in pytree.tree_leaves(carry) if isinstance(t, Tensor)}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            if t.requires_grad and self._inside.get(id(t)) is not t and self.found.get(id(t)) is not t:
                self.found[id(t)] = t
        out = func(*args, **kwargs)
        for t in _tensors(out):
            self._inside[id(t)] = t
        return out


def _tensors(tree: Any) -> Iterator[Tensor]:
    """The tensors in an operation's arguments or results (cheaper than a general pytree walk, on every op)."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class CheckpointedSteps:
    """Steps ``first .. first + schedule.steps - 1`` of an unroll, reversed as ``schedule`` says (see the module
    docstring). ``record`` runs a step with its graph, ``advance`` records nothing; both return the same values."""

    def __init__(self, schedule: Segment, first: int, record: Step, advance: Step, differentiable: Mask) -> None:
        self.schedule, self.first = schedule, first
        self.record, self.advance, self.differentiable = record, advance, differentiable
        self.stored: Dict[int, _StoredState] = {}
        self.outside: List[Tensor] = []
        self._last: List[Tensor] = []
        self.last_carry: Any = None

    def run(self, carry: Any) -> Tuple[Any, List[Tensor]]:
        """The forward pass: the last carry, joined to the graph, and each step's loss."""
        starts = set(stored_positions(self.schedule, self.schedule.steps - 1))
        first_leaves, _ = pytree.tree_flatten(carry)
        watch = _OutsideTensors()
        values = []
        with torch.no_grad(), watch:
            for i in range(self.schedule.steps):
                if i in starts:
                    self.stored[i] = _StoredState(carry, _RNGState())
                watch.start_step(carry)
                carry, value = self.advance(carry, self.first + i)
                values.append(value)
        self.outside = list(watch.found.values())
        inputs = [t for t in first_leaves if isinstance(t, Tensor)]
        last_leaves, spec = pytree.tree_flatten(carry)
        self._last = [t for t in last_leaves if isinstance(t, Tensor)]
        self.last_carry = carry
        joined = iter(_Reversal.apply(self, len(inputs), *inputs, *self.outside))  # type: ignore[no-untyped-call]
        self._last, self.last_carry = [], None  # the graph holds them now; no cycle through this object
        return pytree.tree_unflatten([next(joined) if isinstance(t, Tensor) else t for t in last_leaves],
                                     spec), values

    def state_at(self, i: int) -> _StoredState:
        """State i, keeping only the states the schedule stores while step i is reversed.

        The backward pass reverses steps last to first, and the states stored for step i are those stored for
        step i + 1 up to i, then deeper ones: the stored positions form a stack, popped above i and pushed with
        the states advanced to (only then is the plan consulted)."""
        while next(reversed(self.stored)) > i:
            self.stored.popitem()
        if i not in self.stored:
            top = next(reversed(self.stored))
            for position in stored_positions(self.schedule, i):
                if position > top:
                    self.stored[position] = self._advanced_to(position)
        return self.stored[i]

    def _advanced_to(self, position: int) -> _StoredState:
        start = next(reversed(self.stored))  # the highest stored state, below position
        stored = self.stored[start]
        with stored.rng.restored(), torch.no_grad():
            carry = stored.carry()
            for j in range(start, position):
                carry, _ = self.advance(carry, self.first + j)
            return _StoredState(carry, _RNGState())

    def reverse(self, grad_last: Sequence[Optional[Tensor]]) -> Tuple[List[Optional[Tensor]],
                                                                       List[Optional[Tensor]]]:
        """Gradients of the first carry's tensors and of the outside tensors, given the last carry's."""
        adjoint = list(grad_last)
        outside_grads: List[Optional[Tensor]] = [None] * len(self.outside)
        for i in reversed(range(self.schedule.steps)):
            stored = self.state_at(i)
            carry, leaves = stored.differentiable(self.differentiable)
            with stored.rng.restored(), torch.enable_grad():
                out, _ = self.record(carry, self.first + i)
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
            pairs = [(o, g) for o, g in zip(outputs, adjoint) if g is not None and o.requires_grad]
            wrt = [t for t in leaves if t.requires_grad] + self.outside
            grads: Sequence[Optional[Tensor]]
            if pairs:
                _check_reaches_only(pairs, wrt, self.first + i)
                grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
            else:
                grads = (None,) * len(wrt)
            own = iter(grads[:len(wrt) - len(self.outside)])
            adjoint = [next(own) if t.requires_grad else None for t in leaves]
            outside_grads = [_add(a, b) for a, b in zip(outside_grads, grads[len(wrt) - len(self.outside):])]
        return adjoint, outside_grads


class _Reversal(torch.autograd.Function):
    """The unroll as one node of the graph: inputs the first carry's tensors and the outside tensors."""

    @staticmethod
    def forward(ctx: Any, steps: CheckpointedSteps, n_first: int, *tensors: Tensor) -> Tuple[Tensor, ...]:
        ctx.steps = steps
        last = tuple(steps._last)
        flags = iter(steps.differentiable(steps.last_carry))
        ctx.mark_non_differentiable(*[t for t in last if not next(flags)])
        return last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grad_last: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
        first, outside = ctx.steps.reverse(grad_last)
        return (None, None, *first, *outside)


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _check_reaches_only(pairs: Sequence[Tuple[Tensor, Tensor]], wrt: Sequence[Tensor], step: int) -> None:
    """Raise if the graph of a rerun step reaches a leaf that requires grad other than ``wrt``: its gradient would
    be lost."""
    variable = foreign_leaf([o for o, _ in pairs], wrt)
    if variable is not None:
        raise RuntimeError(f"checkpoint: unrolled step {step} depends on a tensor of shape "
                           f"{tuple(variable.shape)} that requires grad and that the unroll did not see "
                           f"passed to a torch operation; its gradient would be lost. Pass it in args or "
                           f"use checkpoint=False")
