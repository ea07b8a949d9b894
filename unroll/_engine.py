"""The gradient engine every unroll shares: one player's gradient at one unrolled step, and the finiteness check.

``unrolled.py`` (one inner player) and ``game.py`` (several players) both step with :func:`gradient_fn`'s
``differentiate`` and report a non-finite loss or gradient with :func:`raise_if_nonfinite`.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._checks import check_scalar_loss
from ._graph import foreign_leaf

Objective = Callable[..., Tensor]
"""``objective(inputs, *args) -> scalar tensor``: a loss as a function of the parameters being differentiated."""

Differentiate = Callable[[Objective, Dict[str, Tensor], bool, Tuple[Any, ...]], Tuple[Dict[str, Tensor], Tensor]]
"""``differentiate(objective, inputs, tracked, args) -> (grads, detached value)``; ``tracked`` steps keep the graph of
their gradient (when a backward pass can use it), constant ones do not."""


class NonFiniteLossError(FloatingPointError):
    """The inner loss, or the inner gradient, became NaN or infinite during unrolling; ``step`` is the (0-based)
    unrolled step, ``what`` is ``"loss"`` or ``"gradient"`` and ``value`` the non-finite value (for a gradient,
    its smallest or largest entry: NaN, inf or -inf)."""

    def __init__(self, step: int, value: float, what: str = "loss", source: str = "inner_fn") -> None:
        where = f"at unrolled step {step} (0-based, i.e. when computing theta^{step + 1} from theta^{step})"
        if what == "gradient":
            super().__init__(f"the gradient of {source} has a non-finite entry ({value}) {where}, although its "
                             f"loss there is finite")
        else:
            super().__init__(f"{source} returned a non-finite loss ({value}) {where}")
        self.step = step
        self.value = value
        self.what = what


def outer_objective(inner_fn: Objective, outer_fn: Optional[Objective]) -> Objective:
    """The outer player's loss: ``outer_fn``, or ``-inner_fn`` (a zero-sum game) when it is None; checked to be a
    scalar, the error naming the function the user wrote."""
    def outer(params: Dict[str, Tensor], *args: Any) -> Tensor:
        value = inner_fn(params, *args) if outer_fn is None else outer_fn(params, *args)
        check_scalar_loss(value, "inner_fn" if outer_fn is None else "outer_fn")
        return -value if outer_fn is None else value
    return outer


def outer_call_args(args: Tuple[Any, ...], outer_args: Any, outer_fn: Optional[Objective]) -> Tuple[Any, ...]:
    """The arguments the outer loss gets: ``outer_args`` when given (a tuple, and only with an ``outer_fn``), else
    the inner player's ``args``."""
    if outer_args is None:
        return args
    if not isinstance(outer_args, tuple):
        raise TypeError(f"outer_args must be a tuple of arguments for outer_fn, got {type(outer_args).__name__}")
    if outer_fn is None:
        raise ValueError("outer_args needs an outer_fn: the default outer loss is -inner_fn on args")
    return outer_args


def under_torch_func() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...); also if this torch cannot tell (the safe side)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def detach(tree: Any) -> Any:
    """``tree`` with every tensor detached."""
    return pytree.tree_map_only(Tensor, Tensor.detach, tree)


def gradient_fn(*, functorch: bool, records_graph: bool) -> Differentiate:
    """The step's differentiation: a ``torch.func.grad`` transform inside torch.func transforms (and under
    inference mode, where autograd records nothing), plain autograd elsewhere. ``records_graph``: a backward pass
    can use the gradient's graph (autograd is recording)."""
    if functorch:
        def func_differentiate(objective: Objective, inputs: Dict[str, Tensor], tracked: bool,
                               args: Tuple[Any, ...]) -> Tuple[Dict[str, Tensor], Tensor]:
            def with_value(own: Dict[str, Tensor], *args_k: Any) -> Tuple[Tensor, Tensor]:
                value = objective(own, *args_k)
                return value, value.detach()
            grads, value = torch.func.grad(with_value, has_aux=True)(inputs, *args)
            return (grads if tracked else detach(grads)), value
        return func_differentiate

    # Plain autograd does the same arithmetic as torch.func.grad without its per-operation wrapping (up to 15 % of a
    # small discriminator's unroll, docs/benchmarks.md), and records the graph of the gradient only when a backward
    # pass can use it (not for constant steps or under torch.no_grad) and something outside the step requires
    # grad: a graph to the fresh leaves alone would make the result require grad with nothing to differentiate.
    def autograd_differentiate(objective: Objective, inputs: Dict[str, Tensor], tracked: bool,
                               args: Tuple[Any, ...]) -> Tuple[Dict[str, Tensor], Tensor]:
        with torch.enable_grad():
            fresh = [t.detach().requires_grad_() for t in inputs.values() if not t.requires_grad]
            leaves = iter(fresh)
            own = {n: t if t.requires_grad else next(leaves) for n, t in inputs.items()}
            value = objective(own, *args)
            create_graph = (records_graph and tracked
                            and (len(fresh) < len(own) or reaches_outside(value, fresh, args)))
            grads = (torch.autograd.grad(value, list(own.values()), create_graph=create_graph, allow_unused=True)
                     if value.requires_grad else (None,) * len(own))
        return ({n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(inputs.items(), grads)},
                value.detach())
    return autograd_differentiate


def reaches_outside(value: Tensor, fresh: Collection[Tensor], args: Tuple[Any, ...]) -> bool:
    """Whether ``value`` depends on a tensor that requires grad besides the ``fresh`` leaves made for this step:
    one in ``args``, or one the function closes over (found by walking the graph to its leaves)."""
    if any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(args)):
        return True
    return foreign_leaf([value], fresh) is not None


def step_record(value: Tensor, grads: Mapping[str, Tensor]) -> Tensor:
    """``[loss, each gradient's smallest and largest entry]``: they ride along with the loss to the one
    synchronisation at the end of the unroll, so that a NaN gradient is reported at its own step, not as the NaN
    loss of the next one. ``aminmax`` is one pass, several times cheaper than ``isfinite(g).all()``, and finite
    exactly when every entry is, since both extremes propagate NaN."""
    extremes = [m.reshape(1) for g in grads.values() if g.numel() > 0 for m in torch.aminmax(g.detach())]
    return torch.cat([value.reshape(1), *extremes])


def raise_if_nonfinite(records: Union[Tensor, Sequence[Tensor]],
                       source: Callable[[int], Tuple[int, str]] = lambda k: (k, "inner_fn")) -> None:
    """Raise :class:`NonFiniteLossError` at the first record whose loss (``records[k]`` or ``records[k, 0]``) or,
    after it, gradient extremes (``records[k, 1:]``) are not finite. ``source(k)`` names record ``k``: its unrolled
    step and the function that made it. One host synchronisation; skipped under ``torch.func.vmap``."""
    rows: List[Tensor] = [records] if isinstance(records, Tensor) else list(records)
    if isinstance(records, Tensor):
        table = records.reshape(records.shape[0], -1)
    else:
        width = max(r.numel() for r in rows)
        table = torch.stack([torch.cat([r.reshape(-1), r.new_zeros(width - r.numel())]) for r in rows])
    finite = torch.isfinite(table)
    try:
        all_finite = bool(finite.all())
    except RuntimeError:
        # Under torch.func.vmap the losses differ per batch entry and cannot be branched on; skip the check.
        return
    if not all_finite:
        row, column = divmod(int((~finite).flatten().nonzero()[0, 0]), table.shape[1])
        step, name = source(row)
        raise NonFiniteLossError(step, float(table[row, column]), "loss" if column == 0 else "gradient", name)
