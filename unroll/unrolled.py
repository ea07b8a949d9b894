"""Unrolled inner optimization and the surrogate loss of Metz et al. (2017), Eq. 6-12."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Mapping, NamedTuple, Optional, Tuple, Union, overload

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import _schedule
from ._checkpoint import CheckpointedSteps
from ._checks import (
    check_checkpoint,
    check_same_keys,
    check_scalar_loss,
    check_tensor_mapping,
    check_truncate,
    check_unroll_steps,
)
from ._engine import (
    detach,
    gradient_fn,
    outer_call_args,
    outer_objective,
    raise_if_nonfinite,
    step_record,
    under_torch_func,
)
from ._flat import layout_for
from ._live import FirstCallGuarded
from ._types import Params, State
from .optimizer import Optimizer

LossFn = Callable[..., Tensor]
"""``loss(params, *args) -> scalar tensor``; ``params`` holds the player's parameters and buffers."""

StepArgs = Callable[..., Tuple[Any, ...]]
"""``step_args(k, *args) -> args_k``: the arguments ``inner_fn`` sees at unrolled step ``k`` (0-based)."""

TransformGrads = Callable[[Dict[str, Tensor], int], Mapping[str, Tensor]]
"""``transform_grads(grads, k) -> grads``: applied to the inner gradient of unrolled step ``k`` (0-based) before the
optimizer step, inside the differentiated computation (clipping, noise, an all-reduce across ranks, ...)."""


def unrolled_params(inner_fn: LossFn, K: int, stop_grad: bool = False, *, optimizer: Optimizer,
                    step_args: Optional[StepArgs] = None, check_finite: bool = True,
                    checkpoint: Union[bool, int] = False, transform_grads: Optional[TransformGrads] = None,
                    truncate: Optional[int] = None) -> Callable[..., Tuple[Dict[str, Tensor], State]]:
    r"""Return ``run(params, state, *args, buffers=None) -> (params_K, state_K)``: K steps of ``optimizer``.

    .. math::
        \theta^0 = \theta,\qquad
        \theta^{k+1} = \mathrm{step}(\theta^k, \nabla_\theta\, \mathrm{inner\_fn}(\theta^k, *args_k))

    (Eq. 6-7 of Metz et al., 2017, with any :class:`~unroll.Optimizer` in place of gradient ascent). Every step
    stays differentiable with respect to ``params``, ``state`` and whatever ``args`` depend on (e.g. the
    generator's parameters), unless ``stop_grad`` is set, in which case the result is a constant.

    Args:
        inner_fn: the loss the inner player minimises, ``inner_fn(params, *args)`` returning a scalar tensor.
            ``params`` holds the parameters merged with ``buffers``, ready for ``torch.func.functional_call``;
            call that with ``strict=True``, so that a name missing from the mapping is an error instead of a silent
            fall-back to the module's own tensor (see "Buffers" below).
        K: number of unrolled steps (>= 0).
        stop_grad: treat the unrolled parameters as constants (the paper's stop-gradient ablation, App. B.2).
        optimizer: the inner player's optimizer, e.g. ``unroll.adam(1e-4, betas=(0.5, 0.999))``.
        step_args: ``step_args(k, *args) -> args_k`` supplies the arguments of unrolled step ``k``; the default
            uses ``args`` at every step (the paper's fixed minibatch). Return fresh batches to re-sample.
        check_finite: raise :class:`NonFiniteLossError` naming the step if an inner loss, or the inner gradient
            the optimizer receives, is NaN or infinite (the first of them, so a NaN gradient at step k is reported
            at step k, not as the NaN loss it causes at step k + 1). The check costs one synchronisation per call
            and is skipped under ``torch.func.vmap``.
        checkpoint: bound the memory of the differentiated steps by recomputing them in the backward pass; same
            values and gradients as ``False`` (the plain unroll, which keeps every step's activations and
            double-backward graph). An int ``N >= 1`` keeps at most N states θ^k (with their optimizer state)
            besides the first at any moment, recomputing the others with the fewest steps possible (binomial
            checkpointing, Griewank & Walther's *revolve*): memory about ``(N + 1)`` states plus one step's graph,
            whatever K; time about ``(r + 1)`` forward steps per step, where r is the smallest integer with
            ``comb(N + r, N) >= K`` (so ``N`` of order ``log K`` gives ``r`` of order ``log K``). ``True`` keeps
            every state (N = K - 1: memory grows with K by one state per step, one recomputation per step).
            ``inner_fn``, ``step_args`` and ``transform_grads`` run again in the backward pass, with the random
            number generators restored, so they must compute the same way each time. Tensors they use that
            require grad are found as they pass through torch operations; one that cannot be seen is an error in
            the backward pass, never a lost gradient. The result cannot be differentiated twice. Not available
            under ``torch.func`` transforms (refused before any work).
        transform_grads: ``transform_grads(grads, k) -> grads`` is applied to the inner gradient of every unrolled
            step ``k`` (0-based) before the optimizer step, inside the differentiated computation: e.g. clipping by
            global norm, noise, or :func:`unroll.distributed.all_reduce_mean` across ranks. It must return the
            same names and shapes. ``None`` (the identity) gives the plain unroll.
        truncate: differentiate only the last ``truncate`` unrolled steps (0 <= truncate <= K): θ^{K-T} is
            treated as a constant (truncated backpropagation through the unroll), so memory and backward time grow
            with T instead of K. ``None`` or ``K``: the full gradient; ``0``: the same gradient as ``stop_grad``.

    The result requires grad only when something outside the unroll that requires grad reaches it (``params``,
    ``state``, ``args``, tensors the functions close over, tensor hyperparameters), as any torch computation: with
    none, ``backward()`` raises torch's "does not require grad" error instead of silently doing nothing.

    Buffers: ``buffers`` (e.g. ``dict(D.named_buffers())``) are merged into the mapping ``inner_fn`` receives and
    never optimised; in-place updates to them (BatchNorm running statistics) go to copies, so the caller's tensors
    are left untouched. ``torch.func.functional_call`` falls back to the module's own tensor for every name the
    mapping lacks, so without ``buffers=`` a module in training mode would update its live running statistics at
    every unrolled step. The first ``inner_fn`` call of each unroll is watched for that: a module run with tensors
    of the mapping whose forward pass changes a buffer the mapping does not hold gets the buffer restored, and the
    call raises ``RuntimeError`` naming it. Pass frozen parameters (not optimised) in ``buffers`` too.
    """
    spec = _checked_spec(inner_fn, K, stop_grad, optimizer, step_args, check_finite, checkpoint, transform_grads,
                         truncate)

    def run(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None
            ) -> Tuple[Dict[str, Tensor], State]:
        end = _unroll(spec, params, state, args, _copy_buffers(params, buffers))
        return end.params, end.state

    return run


def surrogate_loss(inner_fn: LossFn, K: int, stop_grad: bool = False, *, optimizer: Optimizer,
                   outer_fn: Optional[LossFn] = None, step_args: Optional[StepArgs] = None,
                   average_over_steps: bool = False, check_finite: bool = True,
                   checkpoint: Union[bool, int] = False,
                   transform_grads: Optional[TransformGrads] = None, truncate: Optional[int] = None
                   ) -> Callable[..., Tensor]:
    r"""Return ``surrogate(params, state, *args, buffers=None, outer_args=None) -> value``, the outer player's
    unrolled loss.

    .. math:: f_K = \mathrm{outer\_fn}(\theta^K(\theta, \mathrm{args}), *\mathrm{args})

    is Eq. 9 of Metz et al. (2017): :math:`\theta^K` comes from :func:`unrolled_params`. Differentiating
    ``value`` with respect to the outer player's parameters (inside ``args`` or closed over) gives both terms of
    Eq. 12: the direct dependence of ``outer_fn`` and the response of the K inner steps. With ``K = 0`` it is
    ``outer_fn(params, *args)``, the plain (e.g. GAN) loss.

    Args:
        inner_fn: the loss the inner player minimises, ``inner_fn(params, *args)`` (e.g. the discriminator loss).
        K: number of unrolled inner steps (>= 0).
        stop_grad: treat :math:`\theta^K` as a constant, so the gradient is the first term of Eq. 12 only
            (App. B.2's stop-gradient ablation).
        optimizer: the inner player's optimizer; ``state`` must come from its ``init`` (or :func:`from_torch`).
        outer_fn: the outer player's loss ``outer_fn(params_k, *args)`` (or ``outer_fn(params_k, *outer_args)``
            when the call passes ``outer_args``); default ``-inner_fn`` (zero-sum game).
        step_args: see :func:`unrolled_params` (re-sampled minibatches); ``outer_fn`` always sees ``args``
            (or ``outer_args``).
        average_over_steps: return the mean of ``outer_fn`` over :math:`\theta^1 \dots \theta^K` instead of its
            value at :math:`\theta^K` (App. B.2's third configuration); with ``K = 0``, the value at
            :math:`\theta^0`.
        check_finite, checkpoint, transform_grads, truncate: see :func:`unrolled_params`.

    ``buffers`` (e.g. ``dict(D.named_buffers())``) are merged into the params mapping that ``inner_fn`` and
    ``outer_fn`` see, never optimised; in-place updates to them (BatchNorm running statistics) go to copies, so
    the caller's tensors are left untouched. Pass them whenever the module has buffers, and call
    ``torch.func.functional_call(module, params, args, strict=True)``: a module's own buffer that the mapping lacks
    and that its forward pass changes (BatchNorm in training mode) is restored and refused with ``RuntimeError``
    at the first ``inner_fn`` call and at the ``outer_fn`` call (see :func:`unrolled_params`). ``outer_args`` (a
    tuple) gives ``outer_fn`` its own arguments, e.g. validation data in meta-learning while ``inner_fn`` trains on
    ``args``. The value requires grad only when something outside the unroll that requires grad reaches it.
    """
    spec = _checked_spec(inner_fn, K, stop_grad, optimizer, step_args, check_finite, checkpoint, transform_grads,
                         truncate)
    if outer_fn is not None and not callable(outer_fn):
        raise TypeError(f"outer_fn must be callable or None, got {type(outer_fn).__name__}")

    outer = outer_objective(inner_fn, outer_fn)

    def surrogate(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None,
                  outer_args: Optional[Tuple[Any, ...]] = None) -> Tensor:
        outer_args_k = outer_call_args(args, outer_args, outer_fn)

        guarded_outer = FirstCallGuarded(outer, "inner_fn" if outer_fn is None else "outer_fn")

        def outer_at(params_k: Dict[str, Tensor], buffers_k: Dict[str, Tensor]) -> Tensor:
            return guarded_outer({**params_k, **buffers_k}, *outer_args_k)

        averaged = average_over_steps and spec.K > 0
        end = _unroll(spec, params, state, args, _copy_buffers(params, buffers), outer_at if averaged else None)
        if averaged:
            assert end.outer_values is not None
            return end.outer_values.mean()
        return outer_at(end.params, end.buffers)

    return surrogate


CommittedStep = Callable[..., Tuple[Dict[str, Tensor], State, Tensor]]
"""``step(params, state, *args, buffers=None) -> (new_params, new_state, loss)``."""

CommittedStepWithBuffers = Callable[..., Tuple[Dict[str, Tensor], State, Tensor, Dict[str, Tensor]]]
"""``step(params, state, *args, buffers=None) -> (new_params, new_state, loss, new_buffers)``."""


@overload
def train_step(loss_fn: LossFn, *, optimizer: Optimizer, transform_grads: Optional[TransformGrads] = None,
               check_finite: bool = True, return_buffers: Literal[False] = False) -> CommittedStep: ...


@overload
def train_step(loss_fn: LossFn, *, optimizer: Optimizer, transform_grads: Optional[TransformGrads] = None,
               check_finite: bool = True, return_buffers: Literal[True]) -> CommittedStepWithBuffers: ...


def train_step(loss_fn: LossFn, *, optimizer: Optimizer, transform_grads: Optional[TransformGrads] = None,
               check_finite: bool = True, return_buffers: bool = False
               ) -> Union[CommittedStep, CommittedStepWithBuffers]:
    r"""Return ``step(params, state, *args, buffers=None) -> (new_params, new_state, loss)``: one committed step.

    .. math:: \theta' = \mathrm{step}(\theta, \nabla_\theta\, \mathrm{loss\_fn}(\theta, *args))

    The player's real update (e.g. the discriminator's step before the generator unrolls it), with the same
    gradient machinery, checks and ``transform_grads`` as one unrolled step. ``loss`` is ``loss_fn`` at ``params``
    (detached). The results are constants: nothing is differentiated through a committed step. Composes with
    ``torch.func.vmap`` (several seeds at once; batch ``state["step"]`` too). In-place updates of ``buffers``
    (BatchNorm running statistics) go to copies, as in the unroll; with ``return_buffers=True`` the step returns
    them too, ``(new_params, new_state, loss, new_buffers)``, so that the committed step's statistics can be kept
    (``new_buffers`` is ``{}`` without ``buffers``). A module's own buffer that the mapping lacks and that
    ``loss_fn`` changes is restored and refused, as in :func:`unrolled_params`.
    """
    spec = _checked_spec(loss_fn, 1, True, optimizer, None, check_finite, False, transform_grads, None)

    def step(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None
             ) -> Tuple[Any, ...]:
        end = _unroll(spec, params, state, args, _copy_buffers(params, buffers))
        if return_buffers:
            return end.params, end.state, end.losses[0], end.buffers
        return end.params, end.state, end.losses[0]

    return step


def _checked_spec(inner_fn: Any, K: Any, stop_grad: bool, optimizer: Any, step_args: Any, check_finite: bool,
                  checkpoint: Any, transform_grads: Any, truncate: Any) -> _Unroll:
    K = check_unroll_steps(K)
    _check_callables(inner_fn, optimizer, step_args, transform_grads)
    return _Unroll(inner_fn, K, optimizer, bool(stop_grad), step_args, check_finite, check_checkpoint(checkpoint),
                   transform_grads, check_truncate(truncate, K))


def _check_callables(inner_fn: Any, optimizer: Any, step_args: Any, transform_grads: Any = None) -> None:
    if not callable(inner_fn):
        raise TypeError(f"inner_fn must be callable, got {type(inner_fn).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be an unroll.Optimizer (unroll.adam, unroll.sgd, ..., unroll.from_torch, "
                        f"unroll.param_groups or unroll.custom_optimizer), "
                        f"got {type(optimizer).__name__}")
    if step_args is not None and not callable(step_args):
        raise TypeError(f"step_args must be callable or None, got {type(step_args).__name__}")
    if transform_grads is not None and not callable(transform_grads):
        raise TypeError(f"transform_grads must be callable or None, got {type(transform_grads).__name__}")


def _copy_buffers(params: Params, buffers: Optional[Mapping[str, Tensor]]) -> Dict[str, Tensor]:
    if buffers is None:
        return {}
    check_tensor_mapping(buffers, "buffers", floating=False)
    overlap = [name for name in buffers if name in params]
    if overlap:
        raise KeyError(f"buffers and params share the names {overlap}; buffers are never optimised")
    # In-place updates during the unroll (BatchNorm running statistics) must not reach the caller's tensors.
    return {name: b.detach().clone() for name, b in buffers.items()}


@dataclass(frozen=True)
class _Unroll:
    """The options of one unroll, checked once by the public entry points."""

    inner_fn: LossFn
    K: int
    optimizer: Optimizer
    stop_grad: bool = False
    step_args: Optional[StepArgs] = None
    check_finite: bool = True
    checkpoint: Union[bool, int] = False
    transform_grads: Optional[TransformGrads] = None
    truncate: Optional[int] = None

    @property
    def first_tracked(self) -> int:
        """Steps before this one are constants: all of them under ``stop_grad``, the first K - T under
        ``truncate=T``."""
        if self.stop_grad:
            return self.K
        return self.K - (self.K if self.truncate is None else self.truncate)


class _Carry(NamedTuple):
    """What one unrolled step hands to the next: theta^k and state^k (packed), the buffers, and, when the outer
    loss is averaged over the steps, its values at theta^1..theta^k."""

    params: Dict[str, Tensor]
    state: State
    buffers: Dict[str, Tensor]
    outer_values: Optional[Tensor] = None


def _differentiable(carry: _Carry) -> List[bool]:
    """Gradients flow through the parameters, the optimizer state and the outer values; never through buffers."""
    flags = _Carry(*(pytree.tree_map_only(Tensor, lambda t, on=on: on and t.is_floating_point(), part)
                     for part, on in zip(carry, (True, True, False, True))))
    return pytree.tree_leaves(flags)


@dataclass
class _Unrolled:
    """The end of an unroll: theta^K, state^K and buffers unpacked, the inner losses at theta^0..theta^{K-1}
    (detached), and the outer values when they were asked for."""

    params: Dict[str, Tensor]
    state: State
    buffers: Dict[str, Tensor]
    losses: Tensor
    outer_values: Optional[Tensor]


EachStep = Callable[[Dict[str, Tensor], Dict[str, Tensor]], Tensor]
"""``each_step(params_k, buffers) -> value``: evaluated at theta^1..theta^K inside the unroll (and inside its
recomputations under ``checkpoint``), so that nothing outside keeps every theta^k alive."""


def _unroll(spec: _Unroll, params: Params, state: State, args: Tuple[Any, ...], buffers: Dict[str, Tensor],
            each_step: Optional[EachStep] = None) -> _Unrolled:
    """Run ``spec.K`` steps from (``params``, ``state``); ``buffers`` is the caller's private copy (in-place updates
    by ``inner_fn`` land there, or in per-step copies under checkpointing, where steps run again)."""
    optimizer, K = spec.optimizer, spec.K
    optimizer.check_state(params, state)
    inference = torch.is_inference_mode_enabled()
    functorch = under_torch_func()
    records_graph = torch.is_grad_enabled() and not inference
    checkpointed = bool(spec.checkpoint) and records_graph and spec.first_tracked < K
    if checkpointed and functorch:
        raise RuntimeError("checkpoint cannot run under torch.func transforms (grad/vmap), which do not support "
                           "the custom autograd function that checkpointing joins to the graph; use "
                           "checkpoint=False there")
    if K == 0:
        return _Unrolled(dict(params), state, buffers, torch.zeros(0), None)
    layout = layout_for(params, optimizer.packable)

    def transformed(packed_grads: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
        if spec.transform_grads is None:
            return packed_grads
        grads = layout.unpack(packed_grads)
        new_grads = spec.transform_grads(grads, k)
        _check_transformed(new_grads, grads, k)
        return layout.pack(new_grads)

    guarded_inner = FirstCallGuarded(spec.inner_fn, "inner_fn")

    # Buffers are an explicit (non-differentiated) input: torch.func forbids in-place updates of captured tensors.
    def loss(packed: Dict[str, Tensor], buffers: Dict[str, Tensor], *args_k: Any) -> Tensor:
        value = guarded_inner({**layout.unpack(packed), **buffers}, *args_k)
        check_scalar_loss(value, "inner_fn")
        return value

    # Inside torch.func.grad/vmap the inner gradient must be a transform too; under inference_mode autograd records
    # nothing, while torch.func.grad still differentiates.
    differentiate = gradient_fn(functorch=functorch or inference, records_graph=records_graph)

    loss_dtype = [torch.get_default_dtype()]  # inner_fn's, set by every step

    def step(carry: _Carry, k: int, tracked: bool) -> Tuple[_Carry, Tensor]:
        """theta^{k+1} from theta^k; ``carry.buffers`` is updated in place by ``inner_fn``."""
        args_k = args if spec.step_args is None else _call_step_args(spec.step_args, k, args)
        if not tracked:
            args_k = detach(args_k)
        grads, value = differentiate(loss, carry.params, tracked, (carry.buffers, *args_k))
        # A constant step records no graph at all: not to params or args (detached above), nor to tensor
        # hyperparameters or tensors that transform_grads closes over.
        with contextlib.nullcontext() if tracked else torch.no_grad():
            grads = transformed(grads, k)
            new_params, new_state = optimizer.apply(carry.params, grads, carry.state)
        outer_values = carry.outer_values
        if each_step is not None:
            outer_k = each_step(layout.unpack(new_params), carry.buffers).reshape(1)
            outer_values = outer_k if outer_values is None else torch.cat([outer_values, outer_k])
        loss_dtype[0] = value.dtype
        record = step_record(value, grads) if spec.check_finite else value.reshape(1)
        return _Carry(new_params, new_state, carry.buffers, outer_values), record

    def rerunnable(carry: _Carry, k: int, tracked: bool) -> Tuple[_Carry, Tensor]:
        # A step that runs again must start from its own buffers, not from those its first run updated in place.
        return step(carry._replace(buffers={n: b.clone() for n, b in carry.buffers.items()}), k, tracked)

    carry = _Carry(layout.pack(params), layout.pack_state(state, optimizer.buffers), buffers)
    if spec.first_tracked > 0:
        # Constant steps take constant inputs (stop_grad, truncate): no graph to params or state before them.
        carry = carry._replace(params=detach(carry.params), state=detach(carry.state))
    values = []
    for k in range(spec.first_tracked if checkpointed else K):
        carry, value = step(carry, k, k >= spec.first_tracked)
        values.append(value)
    if checkpointed:
        tracked = K - spec.first_tracked
        slots = tracked if spec.checkpoint is True else spec.checkpoint
        steps = CheckpointedSteps(_schedule.plan(tracked, slots), spec.first_tracked,
                                  record=functools.partial(rerunnable, tracked=True),
                                  advance=functools.partial(rerunnable, tracked=False), differentiable=_differentiable)
        carry, tracked_values = steps.run(carry)
        values.extend(tracked_values)
    records = torch.stack(values)
    if spec.check_finite:
        raise_if_nonfinite(records)
    # torch.cat may have promoted the records to the gradients' dtype; the losses keep inner_fn's (exactly).
    return _Unrolled(layout.unpack(carry.params), layout.unpack_state(carry.state, optimizer.buffers),
                     carry.buffers, records[:, 0].to(loss_dtype[0]), carry.outer_values)


def _check_transformed(new_grads: Any, grads: Mapping[str, Tensor], k: int) -> None:
    what = f"transform_grads(grads, {k}) result"
    check_tensor_mapping(new_grads, what, floating=True)
    check_same_keys(grads, new_grads, what)
    for name, g in grads.items():
        if new_grads[name].shape != g.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(new_grads[name].shape)} but the gradient has shape "
                             f"{tuple(g.shape)}")


def _call_step_args(step_args: StepArgs, k: int, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    args_k = step_args(k, *args)
    if not isinstance(args_k, tuple):
        raise TypeError(f"step_args must return a tuple of arguments for inner_fn, got {type(args_k).__name__}")
    return args_k
