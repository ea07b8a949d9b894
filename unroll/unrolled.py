"""Unrolled inner optimization and the surrogate loss of Metz et al. (2017), Eq. 6-12."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch import Tensor

from ._flat import FlatLayout, layout_for
from ._checks import check_same_keys, check_scalar_loss, check_tensor_mapping, check_truncate, check_unroll_steps
from ._types import Params, State
from .optimizer import Optimizer

LossFn = Callable[..., Tensor]
"""``loss(params, *args) -> scalar tensor``; ``params`` holds the player's parameters and buffers."""

StepArgs = Callable[..., Tuple[Any, ...]]
"""``step_args(k, *args) -> args_k``: the arguments ``inner_fn`` sees at unrolled step ``k`` (0-based)."""

TransformGrads = Callable[[Dict[str, Tensor], int], Mapping[str, Tensor]]
"""``transform_grads(grads, k) -> grads``: applied to the inner gradient of unrolled step ``k`` (0-based) before the
optimizer step, inside the differentiated computation (clipping, noise, an all-reduce across ranks, ...)."""


class NonFiniteLossError(FloatingPointError):
    """The inner loss became NaN or infinite during unrolling; ``step`` is the (0-based) unrolled step."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"inner_fn returned a non-finite loss ({value}) at unrolled step {step} "
                         f"(0-based, i.e. when computing theta^{step + 1} from theta^{step})")
        self.step = step
        self.value = value


def unrolled_params(inner_fn: LossFn, K: int, stop_grad: bool = False, *, optimizer: Optimizer,
                    step_args: Optional[StepArgs] = None, check_finite: bool = True, checkpoint: bool = False,
                    transform_grads: Optional[TransformGrads] = None, truncate: Optional[int] = None
                    ) -> Callable[..., Tuple[Dict[str, Tensor], State]]:
    r"""Return ``run(params, state, *args, buffers=None) -> (params_K, state_K)``: K steps of ``optimizer`` on ``inner_fn``.

    .. math:: \theta^0 = \theta,\qquad \theta^{k+1} = \mathrm{step}(\theta^k, \nabla_\theta\, \mathrm{inner\_fn}(\theta^k, *args_k))

    (Eq. 6-7 of Metz et al., 2017, with any :class:`~unroll.Optimizer` in place of gradient ascent). Every step
    stays differentiable with respect to ``params``, ``state`` and whatever ``args`` depend on (e.g. the
    generator's parameters), unless ``stop_grad`` is set, in which case the result is a constant.

    Args:
        inner_fn: the loss the inner player minimises, ``inner_fn(params, *args)`` returning a scalar tensor.
            ``params`` holds the parameters merged with ``buffers``, ready for ``torch.func.functional_call``.
        K: number of unrolled steps (>= 0).
        stop_grad: treat the unrolled parameters as constants (the paper's stop-gradient ablation, App. B.2).
        optimizer: the inner player's optimizer, e.g. ``unroll.adam(1e-4, betas=(0.5, 0.999))``.
        step_args: ``step_args(k, *args) -> args_k`` supplies the arguments of unrolled step ``k``; the default
            uses ``args`` at every step (the paper's fixed minibatch). Return fresh batches to re-sample.
        check_finite: raise :class:`NonFiniteLossError` naming the step if an inner loss is NaN or infinite.
            The check costs one synchronisation per call and is skipped under ``torch.func.vmap``.
        checkpoint: recompute each unrolled step during the backward pass (non-reentrant
            :func:`torch.utils.checkpoint.checkpoint`) instead of keeping its activations, for roughly one more
            forward pass per step. Same values and gradients. Memory still grows with K, but only by what each step
            hands to the next (θ^k and the optimizer buffers, a few copies of the parameters per step), not by
            the inner loss's activations and double-backward graph: the saving is large when activations dominate
            (big batches, small players) and small for very long unrolls of tiny models. To bound memory in K,
            use ``truncate``. Not available under ``torch.func`` transforms (they do not support saved-tensor
            hooks).
        transform_grads: ``transform_grads(grads, k) -> grads`` is applied to the inner gradient of every unrolled
            step ``k`` (0-based) before the optimizer step, inside the differentiated computation: e.g. clipping by
            global norm, noise, or :func:`unroll.distributed.all_reduce_mean` across ranks. It must return the
            same names and shapes. ``None`` (the identity) gives the plain unroll.
        truncate: differentiate only the last ``truncate`` unrolled steps (0 <= truncate <= K): θ^{K-T} is
            treated as a constant (truncated backpropagation through the unroll), so memory and backward time grow
            with T instead of K. ``None`` or ``K``: the full gradient; ``0``: the same gradient as ``stop_grad``.
    """
    K = check_unroll_steps(K)
    _check_callables(inner_fn, optimizer, step_args, transform_grads)
    truncate = check_truncate(truncate, K)

    def run(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None
            ) -> Tuple[Dict[str, Tensor], State]:
        last = None
        for last in _trajectory(inner_fn, K, stop_grad, optimizer, step_args, check_finite, checkpoint,
                                transform_grads, truncate, params, state, args, buffers):
            pass
        return (dict(params), state) if last is None else (last.params(), last.state())

    return run


def surrogate_loss(inner_fn: LossFn, K: int, stop_grad: bool = False, *, optimizer: Optimizer,
                   outer_fn: Optional[LossFn] = None, step_args: Optional[StepArgs] = None,
                   average_over_steps: bool = False, check_finite: bool = True, checkpoint: bool = False,
                   transform_grads: Optional[TransformGrads] = None, truncate: Optional[int] = None
                   ) -> Callable[..., Tensor]:
    r"""Return ``surrogate(params, state, *args, buffers=None, outer_args=None) -> value``, the outer player's unrolled loss.

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
    the caller's tensors are left untouched. ``outer_args`` (a tuple) gives ``outer_fn`` its own arguments, e.g.
    validation data in meta-learning while ``inner_fn`` trains on ``args``.
    """
    K = check_unroll_steps(K)
    _check_callables(inner_fn, optimizer, step_args, transform_grads)
    truncate = check_truncate(truncate, K)
    if outer_fn is not None and not callable(outer_fn):
        raise TypeError(f"outer_fn must be callable or None, got {type(outer_fn).__name__}")

    def outer(params: Params, *args: Any) -> Tensor:
        if outer_fn is None:
            value = inner_fn(params, *args)
            check_scalar_loss(value, "inner_fn")
            return -value
        value = outer_fn(params, *args)
        check_scalar_loss(value, "outer_fn")
        return value

    def surrogate(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None,
                  outer_args: Optional[Tuple[Any, ...]] = None) -> Tensor:
        if outer_args is not None and not isinstance(outer_args, tuple):
            raise TypeError(f"outer_args must be a tuple of arguments for outer_fn, got {type(outer_args).__name__}")
        if outer_args is not None and outer_fn is None:
            raise ValueError("outer_args needs an outer_fn: the default outer loss is -inner_fn on args")
        outer_call_args = args if outer_args is None else outer_args
        buffers = _copy_buffers(params, buffers)
        trajectory = _trajectory(inner_fn, K, stop_grad, optimizer, step_args, check_finite, checkpoint,
                                 transform_grads, truncate, params, state, args, buffers, buffers_copied=True)
        if not average_over_steps or K == 0:
            last = None
            for last in trajectory:
                pass
            params_k = dict(params) if last is None else last.params()
            return outer({**params_k, **buffers}, *outer_call_args)
        values = [outer({**step.params(), **buffers}, *outer_call_args) for step in trajectory]
        return torch.stack(values).mean()

    return surrogate


def train_step(loss_fn: LossFn, *, optimizer: Optimizer, transform_grads: Optional[TransformGrads] = None,
               check_finite: bool = True) -> Callable[..., Tuple[Dict[str, Tensor], State, Tensor]]:
    r"""Return ``step(params, state, *args, buffers=None) -> (new_params, new_state, loss)``: one committed step.

    .. math:: \theta' = \mathrm{step}(\theta, \nabla_\theta\, \mathrm{loss\_fn}(\theta, *args))

    The player's real update (e.g. the discriminator's step before the generator unrolls it), with the same
    gradient machinery, checks and ``transform_grads`` as one unrolled step. ``loss`` is ``loss_fn`` at ``params``
    (detached). The results are constants: nothing is differentiated through a committed step. Composes with
    ``torch.func.vmap`` (several seeds at once; batch ``state["step"]`` too). In-place updates of ``buffers``
    (BatchNorm running statistics) go to copies, as in the unroll.
    """
    _check_callables(loss_fn, optimizer, None, transform_grads)

    def step(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None
             ) -> Tuple[Dict[str, Tensor], State, Tensor]:
        (only,) = _trajectory(loss_fn, 1, True, optimizer, None, check_finite, False, transform_grads, None, params,
                              state, args, buffers)
        return only.params(), only.state(), only.loss

    return step


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


class _UnrolledStep:
    """theta^k and state^k, kept packed until asked for (unpacking is only needed at the end); ``loss`` is the
    inner loss at theta^{k-1}, the value the step's gradient came from (detached)."""

    def __init__(self, layout: FlatLayout, optimizer: Optimizer, params: Dict[str, Tensor], state: State,
                 loss: Tensor) -> None:
        self._layout, self._optimizer, self._params, self._state = layout, optimizer, params, state
        self.loss = loss

    def params(self) -> Dict[str, Tensor]:
        return self._layout.unpack(self._params)

    def state(self) -> State:
        return self._layout.unpack_state(self._state, self._optimizer.buffers)


def _trajectory(inner_fn: LossFn, K: int, stop_grad: bool, optimizer: Optimizer, step_args: Optional[StepArgs],
                check_finite: bool, checkpoint: bool, transform_grads: Optional[TransformGrads],
                truncate: Optional[int], params: Params, state: State, args: Tuple[Any, ...],
                buffers: Optional[Mapping[str, Tensor]], buffers_copied: bool = False) -> Iterator[_UnrolledStep]:
    """Yield theta^k, state^k for k = 1..K, after checking every input once.

    Steps ``k < first_tracked`` are constants (no graph to params, state or args): all of them under
    ``stop_grad``, the first K - T under ``truncate=T``.
    """
    if not buffers_copied:
        buffers = _copy_buffers(params, buffers)
    assert buffers is not None
    optimizer.check_state(params, state)
    if K == 0:
        return
    layout = layout_for(params, optimizer.packable)
    first_tracked = K if stop_grad else K - (K if truncate is None else truncate)

    def transformed(packed_grads: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
        if transform_grads is None:
            return packed_grads
        grads = layout.unpack(packed_grads)
        new_grads = transform_grads(grads, k)
        _check_transformed(new_grads, grads, k)
        return layout.pack(new_grads)

    # Buffers are an explicit (non-differentiated) input: torch.func forbids in-place updates of captured tensors.
    def loss(packed: Dict[str, Tensor], buffers: Dict[str, Tensor], *args_k: Any) -> Tuple[Tensor, Tensor]:
        value = inner_fn({**layout.unpack(packed), **buffers}, *args_k)
        check_scalar_loss(value, "inner_fn")
        return value, value.detach()

    def autograd_grads(packed: Dict[str, Tensor], create_graph: bool, *args_k: Any
                       ) -> Tuple[Dict[str, Tensor], Tensor]:
        with torch.enable_grad():
            inputs = {n: t if t.requires_grad else t.detach().requires_grad_() for n, t in packed.items()}
            value = loss(inputs, buffers, *args_k)[0]
            grads = (torch.autograd.grad(value, list(inputs.values()), create_graph=create_graph, allow_unused=True)
                     if value.requires_grad else (None,) * len(inputs))
        return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(packed.items(), grads)}, value.detach()

    inference = torch.is_inference_mode_enabled()
    if _under_torch_func() or inference:
        # Inside torch.func.grad/vmap the inner gradient must be a transform too; under inference_mode autograd
        # records nothing, while torch.func.grad still differentiates.
        func_grad = torch.func.grad(loss, has_aux=True)

        def inner_grads(packed: Dict[str, Tensor], tracked: bool, *args_k: Any) -> Tuple[Dict[str, Tensor], Tensor]:
            grads, value = func_grad(packed, buffers, *args_k)
            return (grads if tracked else _detach(grads)), value
    else:
        # Plain autograd does the same arithmetic as torch.func.grad without its per-operation wrapping (up to 15 %
        # of a small discriminator's unroll, docs/benchmarks.md), and records the graph of the inner gradient
        # only when a backward pass can use it (not for constant steps or under torch.no_grad).
        grad_enabled = torch.is_grad_enabled()

        def inner_grads(packed: Dict[str, Tensor], tracked: bool, *args_k: Any) -> Tuple[Dict[str, Tensor], Tensor]:
            return autograd_grads(packed, grad_enabled and tracked, *args_k)

    def recomputable_step(packed: Dict[str, Tensor], state: State, k: int, *args_k: Any
                          ) -> Tuple[Dict[str, Tensor], State, Tensor]:
        # torch.func.grad refuses saved-tensor hooks, which checkpointing relies on: autograd.grad only.
        grads, value = autograd_grads(packed, True, *args_k)
        return (*optimizer.apply(packed, transformed(grads, k), state), value)

    params_k, state_k = layout.pack(params), layout.pack_state(state, optimizer.buffers)
    losses: List[Tensor] = []
    for k in range(K):
        tracked = k >= first_tracked
        if first_tracked > 0 and k in (0, first_tracked):
            # Constant steps take constant inputs, and theta^{first_tracked} enters the tracked steps as a constant
            # (stop_grad, truncate): no graph to params, state or tensor hyperparameters before it.
            params_k, state_k = _detach((params_k, state_k))
        args_k = args if step_args is None else _call_step_args(step_args, k, args)
        if not tracked:
            args_k = _detach(args_k)
        if checkpoint and tracked and not inference:  # no backward pass follows inference_mode
            params_k, state_k, value = _checkpointed(recomputable_step, params_k, state_k, k, *args_k)
        else:
            grads, value = inner_grads(params_k, tracked, *args_k)
            params_k, state_k = optimizer.apply(params_k, transformed(grads, k), state_k)
        losses.append(value)
        if check_finite and k == K - 1:
            _raise_if_nonfinite(losses)
        yield _UnrolledStep(layout, optimizer, params_k, state_k, value)


def _check_transformed(new_grads: Any, grads: Mapping[str, Tensor], k: int) -> None:
    what = f"transform_grads(grads, {k}) result"
    check_tensor_mapping(new_grads, what, floating=True)
    check_same_keys(grads, new_grads, what)
    for name, g in grads.items():
        if new_grads[name].shape != g.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(new_grads[name].shape)} but the gradient has shape "
                             f"{tuple(g.shape)}")


def _under_torch_func() -> bool:
    """True inside a torch.func transform (grad, vmap, jvp, ...); also if this torch cannot tell (the safe side)."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def _checkpointed(step: Callable[..., Any], *inputs: Any) -> Any:
    try:
        return torch.utils.checkpoint.checkpoint(step, *inputs, use_reentrant=False)
    except RuntimeError as error:
        if "saved tensor hooks" in str(error):
            raise RuntimeError("checkpoint=True cannot run under torch.func transforms (grad/vmap), which do not "
                               "support the saved-tensor hooks that checkpointing uses; use checkpoint=False "
                               "there") from error
        raise


def _call_step_args(step_args: StepArgs, k: int, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    args_k = step_args(k, *args)
    if not isinstance(args_k, tuple):
        raise TypeError(f"step_args must return a tuple of arguments for inner_fn, got {type(args_k).__name__}")
    return args_k


def _detach(tree: Any) -> Any:
    return pytree.tree_map_only(Tensor, Tensor.detach, tree)


def _raise_if_nonfinite(losses: List[Tensor]) -> None:
    finite = torch.isfinite(torch.stack(losses))
    try:
        all_finite = bool(finite.all())
    except RuntimeError:
        # Under torch.func.vmap the losses differ per batch entry and cannot be branched on; skip the check.
        return
    if not all_finite:
        step = int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(step, float(losses[step]))
