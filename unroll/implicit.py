r"""Implicit differentiation of the inner problem's solution (the implicit function theorem).

When the inner optimisation converges to a fixed point :math:`\theta^*(\phi)` of its update, the hypergradient of
:math:`f(\phi) = \mathrm{outer}(\theta^*(\phi), \phi)` needs no unroll. With the stationarity condition
:math:`\nabla_\theta L(\theta^*, \phi) = 0` and :math:`H = \nabla^2_\theta L` invertible, the implicit function
theorem gives :math:`d\theta^*/d\phi = -H^{-1}\, \partial^2 L/\partial\theta\,\partial\phi`, so

.. math:: \frac{df}{d\phi} = \frac{\partial\,\mathrm{outer}}{\partial\phi}
          - \Big(\frac{\partial^2 L}{\partial\phi\,\partial\theta}\Big)^{\!\top} v,\qquad
          H v = \nabla_\theta\,\mathrm{outer}.

``v`` is found by conjugate gradient (Pedregosa, "Hyperparameter optimization with approximate gradient", ICML
2016; Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019), by a truncated
Neumann series (Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020), or through the optimizer's own update map :math:`\theta^* = T(\theta^*, \phi)`:
:math:`v = J_\theta T^\top v + \nabla_\theta\,\mathrm{outer}` and
:math:`df/d\phi = \partial\,\mathrm{outer}/\partial\phi + (\partial T/\partial\phi)^\top v` (``solver="fixed_point"``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Iterator, Literal, Mapping, NamedTuple, Optional, Tuple, Union, overload

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._checks import check_scalar_loss, check_tensor_mapping, check_unroll_steps
from ._engine import outer_call_args, outer_objective
from ._math import is_zero
from ._types import Params, State
from .optimizer import Optimizer
from .unrolled import LossFn, train_step

SOLVERS = ("cg", "neumann", "fixed_point")

Vector = Dict[str, Tensor]
"""A vector in parameter space, keyed like the params."""


class ImplicitInfo(NamedTuple):
    """How well the implicit gradient's assumptions and linear solve hold at :math:`\\theta^*`.

    ``residual`` is :math:`\\|A v - b\\| / \\|b\\|` for the solved system (:math:`A = H` for cg/neumann,
    :math:`I - J_\\theta T^\\top` for fixed_point; 0 when :math:`b = 0`); ``stationarity`` is
    :math:`\\|\\nabla_\\theta L(\\theta^*)\\|` (cg/neumann) or :math:`\\|T(\\theta^*) - \\theta^*\\|` (fixed_point):
    the theorem assumes it is 0. ``iterations`` is the number of solver iterations used."""

    solver: str
    iterations: int
    residual: Tensor
    stationarity: Tensor


Surrogate = Callable[..., Tensor]
SurrogateWithInfo = Callable[..., Tuple[Tensor, ImplicitInfo]]


@overload
def implicit_loss(inner_fn: LossFn, K: int, *, optimizer: Optimizer, outer_fn: Optional[LossFn] = None,
                  solver: str = "cg", iterations: int = 100, tol: float = 1e-10, step_size: Optional[float] = None,
                  check_finite: bool = True, return_info: Literal[False] = False) -> Surrogate: ...


@overload
def implicit_loss(inner_fn: LossFn, K: int, *, optimizer: Optimizer, outer_fn: Optional[LossFn] = None,
                  solver: str = "cg", iterations: int = 100, tol: float = 1e-10, step_size: Optional[float] = None,
                  check_finite: bool = True, return_info: Literal[True]) -> SurrogateWithInfo: ...


def implicit_loss(inner_fn: LossFn, K: int, *, optimizer: Optimizer, outer_fn: Optional[LossFn] = None,
                  solver: str = "cg", iterations: int = 100, tol: float = 1e-10, step_size: Optional[float] = None,
                  check_finite: bool = True, return_info: bool = False) -> Union[Surrogate, SurrogateWithInfo]:
    r"""Return ``surrogate(params, state, *args, buffers=None, outer_args=None)``: the outer loss at the inner
    solution, differentiated implicitly.

    :math:`\theta^*` is reached by K committed steps of ``optimizer`` on ``inner_fn`` (no graph: memory does not
    grow with K). The value is exactly ``outer_fn(theta*, *args)``; its first derivatives with respect to
    everything outside that requires grad (tensors in ``args``/``outer_args``, closed-over tensors, and, with
    ``fixed_point``, tensor hyperparameters of ``optimizer``) are the implicit-function-theorem hypergradient (see
    the module docstring), attached by a zero-valued term. Arguments, ``buffers`` and ``outer_args`` mean what
    they mean for :func:`unroll.surrogate_loss`; ``outer_fn`` defaults to ``-inner_fn``.

    Args:
        solver: ``"cg"`` (conjugate gradient on :math:`Hv = b`, H definite), ``"neumann"`` (:math:`v = a
            \sum_{i<n} (I - aH)^i b`, needs :math:`0 < a < 2/\lambda_{\max}(H)`) or ``"fixed_point"`` (:math:`v
            \leftarrow J_\theta T^\top v + b` through the update map at :math:`(\theta^*, \mathrm{state}^*)`;
            needs :math:`T` contractive; it handles the optimizer's weight decay and tensor hyperparameters).
        iterations: the most solver iterations (each one Hessian- or Jacobian-vector product).
        tol: stop once :math:`\|b - Av\| \le \mathrm{tol}\,\|b\|`.
        step_size: the Neumann step :math:`a`; default the optimizer's ``lr``.
        check_finite: raise on a non-finite inner loss or gradient during the K steps, and
            ``FloatingPointError`` when the solve diverged (``v`` not finite, or for neumann/fixed_point a final
            residual above 1, i.e. worse than ``v = 0``).
        return_info: also return an :class:`ImplicitInfo`.

    The implicit gradient with respect to ``params`` and ``state`` (the starting point) is zero: nothing flows to
    them. Second derivatives of the value are not the implicit ones (:math:`\theta^*` and ``v`` are constants).
    """
    K = check_unroll_steps(K)
    committed = train_step(inner_fn, optimizer=optimizer, check_finite=check_finite, return_buffers=True)
    if outer_fn is not None and not callable(outer_fn):
        raise TypeError(f"outer_fn must be callable or None, got {type(outer_fn).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(f"iterations (the most solver iterations) must be an int, got {type(iterations).__name__}: "
                        f"{iterations!r}")
    if iterations < 1:
        raise ValueError(f"iterations (the most solver iterations) must be >= 1, got {iterations}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol (the relative residual to stop at) must be a real number, got {type(tol).__name__}")
    if not tol >= 0:  # NaN fails the comparison too
        raise ValueError(f"tol (the relative residual to stop at) must be >= 0, got {tol}")
    step = 1.0
    if solver == "neumann":
        step = _neumann_step(step_size, optimizer)
    elif step_size is not None:
        raise ValueError(f"step_size is the Neumann series step, unused by solver={solver!r}; leave it None")
    if solver != "fixed_point" and any(not is_zero(wd) for wd in _weight_decays(optimizer)):
        raise ValueError(f"solver={solver!r} cannot use {optimizer!r}: its weight_decay penalty is not part of "
                         f"inner_fn's stationarity condition; put the penalty in inner_fn or use "
                         f"solver=\"fixed_point\"")

    outer = outer_objective(inner_fn, outer_fn)

    def surrogate(params: Params, state: State, *args: Any, buffers: Optional[Mapping[str, Tensor]] = None,
                  outer_args: Optional[Tuple[Any, ...]] = None) -> Any:
        outer_args_k = outer_call_args(args, outer_args, outer_fn)
        optimizer.check_state(params, state)
        if buffers is not None:
            check_tensor_mapping(buffers, "buffers", floating=False)
            shared = [name for name in buffers if name in params]
            if shared:
                raise KeyError(f"buffers and params share the names {shared}; buffers are never optimised")
        end_buffers = dict(buffers or {})
        theta, opt_state = dict(params), state
        for _ in range(K):
            theta, opt_state, _, end_buffers = committed(theta, opt_state, *args, buffers=end_buffers)
        theta, opt_state = pytree.tree_map_only(Tensor, Tensor.detach, (theta, opt_state))

        def merged(point: Params) -> Dict[str, Tensor]:
            # Fresh copies each call: in-place buffer updates (BatchNorm) neither accumulate nor escape.
            return {**point, **{name: b.detach().clone() for name, b in end_buffers.items()}}

        def inner_at(point: Params) -> Tensor:
            value = inner_fn(merged(point), *args)
            check_scalar_loss(value, "inner_fn")
            return value

        inner_grad = torch.func.grad(inner_at)

        def update_map(point: Params) -> Dict[str, Tensor]:
            return optimizer.apply(point, inner_grad(point), opt_state)[0]

        value = outer(merged(theta), *outer_args_k)
        with torch.no_grad():  # the solve is constant: torch.func differentiates inside, nothing records outside
            b = torch.func.grad(lambda point: outer(merged(point), *outer_args_k))(theta)
            if solver == "fixed_point":
                _, transpose_jacobian = torch.func.vjp(update_map, theta)
                v, used, residual = _richardson(lambda x: _axpy(-1.0, transpose_jacobian(x)[0], x), b, 1.0,
                                                iterations, tol)
            else:
                _, hessian = torch.func.vjp(inner_grad, theta)  # H is symmetric: its vjp is its product
                if solver == "cg":
                    v, used, residual = _conjugate_gradient(lambda x: hessian(x)[0], b, iterations, tol)
                else:  # Neumann's series is Richardson's iteration with step a (Lorraine et al., 2020)
                    v, used, residual = _richardson(lambda x: hessian(x)[0], b, step, iterations, tol)
        if check_finite:
            _check_solved(solver, v, used, residual)
        if solver == "fixed_point":
            moved = update_map(theta)  # differentiable in phi: (dT/dphi)^T v
            carrier = _dot(moved, v)
            stationarity = _norm(_axpy(-1.0, theta, moved)).detach()
        else:
            gradient = inner_grad(theta)  # differentiable in phi: -(d^2 L / dphi dtheta)^T v
            carrier = -_dot(gradient, v)
            stationarity = _norm(gradient).detach()
        value = value + (carrier - carrier.detach())
        if return_info:
            return value, ImplicitInfo(solver, used, residual, stationarity)
        return value

    return surrogate


Operator = Callable[[Vector], Vector]
Solved = Tuple[Vector, int, Tensor]
"""``(v, iterations used, ||b - A v|| / ||b||)``."""


def _conjugate_gradient(apply: Operator, b: Vector, iterations: int, tol: float) -> Solved:
    """Conjugate gradient for A v = b (A symmetric definite), from v = 0; the residual is recomputed at the end."""
    v, r, p = _zeros(b), b, b
    squared = _dot(r, r)
    b_norm, used = _read(squared) ** 0.5, 0
    while used < iterations and _read(squared) ** 0.5 > tol * b_norm:
        a_p = apply(p)
        alpha = squared / _dot(p, a_p)
        v, r = _axpy(alpha, p, v), _axpy(-alpha, a_p, r)
        squared, previous = _dot(r, r), squared
        p = _axpy(squared / previous, p, r)
        used += 1
    return v, used, _relative(_axpy(-1.0, apply(v), b), b_norm)


def _richardson(apply: Operator, b: Vector, step: float, iterations: int, tol: float) -> Solved:
    """``v <- v + a (b - A v)`` from v = 0, so ``v_n = a sum_{i<n} (I - aA)^i b`` (Neumann's series); with
    A = I - J^T and a = 1 it is ``v <- J^T v + b``. The b - Av each update needs is the current residual."""
    v, r, used = _zeros(b), b, 0
    b_norm = _read(_norm(b))
    while used < iterations and _read(_norm(r)) > tol * b_norm:
        v = _axpy(step, r, v)
        r = _axpy(-1.0, apply(v), b)
        used += 1
    return v, used, _relative(r, b_norm)


_DIVERGENCE_HINTS = {
    "cg": "is the Hessian of inner_fn definite at theta*?",
    "neumann": "step_size must be below 2 / (the largest Hessian eigenvalue)",
    "fixed_point": "the optimizer's update at its final state is not a contraction there (e.g. Adam or RMSProp, "
                   "whose step lr / sqrt(v) grows as v decays); use solver='cg'",
}


def _check_solved(solver: str, v: Vector, used: int, residual: Tensor) -> None:
    """Refuse a non-finite ``v`` and, for the Richardson iterations (residual (I - aA)^n b), a final residual above
    that of v = 0: then I - aA expands some direction and more iterations would only make it worse."""
    finite = all(bool(torch.isfinite(t).all()) for t in v.values())
    if not finite or (solver != "cg" and float(residual) > 1):
        raise FloatingPointError(f"the {solver} solve for the implicit gradient diverged after {used} iterations "
                                 f"(relative residual {float(residual):.3g}): {_DIVERGENCE_HINTS[solver]}")


def _neumann_step(step_size: Any, optimizer: Optimizer) -> float:
    if step_size is None:
        lr = optimizer.hyperparams.get("lr")
        if lr is None:
            raise ValueError(f"solver='neumann' needs step_size=: {optimizer!r} has no single lr to default to")
        step_size = float(lr.detach()) if isinstance(lr, Tensor) else lr
    if isinstance(step_size, bool) or not isinstance(step_size, numbers.Real) or not 0 < float(step_size) < math.inf:
        raise ValueError(f"step_size (the Neumann series step) must be a finite number > 0, got {step_size!r}")
    return float(step_size)


def _weight_decays(optimizer: Optimizer) -> Iterator[Any]:
    """Every ``weight_decay`` hyperparameter, including those of param_groups' member optimizers."""
    for key, value in optimizer.hyperparams.items():
        if isinstance(value, Optimizer):
            yield from _weight_decays(value)
        elif key == "weight_decay":
            yield value


def _read(value: Tensor) -> float:
    """The solver's stopping test reads values, which torch.func.vmap cannot batch."""
    try:
        return float(value)
    except RuntimeError as error:
        raise RuntimeError("implicit_loss cannot run under torch.func.vmap: its solvers stop on tested values; "
                           "loop over the batch instead (torch.func.grad is supported)") from error


def _zeros(x: Vector) -> Vector:
    return {n: torch.zeros_like(t) for n, t in x.items()}


def _axpy(alpha: Union[float, Tensor], x: Vector, y: Vector) -> Vector:
    """``alpha * x + y``."""
    return {n: alpha * x[n] + y[n] for n in y}


def _dot(x: Vector, y: Vector) -> Tensor:
    terms = [(x[n] * y[n]).sum() for n in y]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _norm(x: Vector) -> Tensor:
    return _dot(x, x).sqrt()


def _relative(r: Vector, b_norm: float) -> Tensor:
    return _norm(r) / b_norm if b_norm > 0 else torch.zeros_like(_norm(r))
