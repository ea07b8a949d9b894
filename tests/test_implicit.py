"""Tests of ``unroll.implicit_loss``: implicit-function-theorem hypergradients against closed forms and long unrolls.

Ridge regression has the closed-form solution theta* = (X^T X + lam I)^{-1} X^T y, and by the implicit function
theorem dtheta*/dlam = -(X^T X + lam I)^{-1} theta*: both written out below with ``torch.linalg.solve``,
independently of the package. Everything is float64.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DTYPE = torch.float64
DIM = 5
LOG_WD = math.log(0.5)
SOLVERS = ("cg", "neumann", "fixed_point")
# SGD at lr 0.3 contracts the ridge problem (Hessian eigenvalues in [0.94, 2.78]) by at least 0.72 per step, so
# 150 steps reach theta* to rounding (0.72^150 ~ 1e-22); fixed_point uses a small lr of 0.1 (rate 0.906): 400
# committed steps (0.906^400 ~ 1e-17) and up to 1000 solver iterations (about 320 are used to reach tol = 1e-14).
RIDGE_SETUPS: Dict[str, Tuple[unroll.Optimizer, int, int]] = {
    "cg": (unroll.sgd(0.3), 150, 50),
    "neumann": (unroll.sgd(0.3), 150, 300),
    "fixed_point": (unroll.sgd(0.1), 400, 1000),
}


def _data(seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(20, DIM, generator=gen, dtype=DTYPE) / 20 ** 0.5
    y = torch.randn(20, generator=gen, dtype=DTYPE)
    Xv = torch.randn(10, DIM, generator=gen, dtype=DTYPE) / 10 ** 0.5
    yv = torch.randn(10, generator=gen, dtype=DTYPE)
    return X, y, Xv, yv


def _ridge(params: Dict[str, Tensor], log_wd: Any, X: Tensor, y: Tensor) -> Tensor:
    w = params["w"]
    return 0.5 * (X @ w - y).pow(2).sum() + 0.5 * torch.as_tensor(log_wd).exp() * w.pow(2).sum()


def _least_squares(params: Dict[str, Tensor], X: Tensor, y: Tensor) -> Tensor:
    return 0.5 * (X @ params["w"] - y).pow(2).sum()


def _validation(params: Dict[str, Tensor], Xv: Tensor, yv: Tensor) -> Tensor:
    return 0.5 * (Xv @ params["w"] - yv).pow(2).sum()


def _closed_form(lam: Tensor, X: Tensor, y: Tensor, Xv: Tensor, yv: Tensor) -> Tuple[Tensor, Tensor]:
    """theta* and d outer / d lam by the implicit function theorem: dtheta*/dlam = -A^{-1} theta*."""
    A = X.T @ X + lam * torch.eye(DIM, dtype=DTYPE)
    theta = torch.linalg.solve(A, X.T @ y)
    outer_grad = Xv.T @ (Xv @ theta - yv)
    return theta, -outer_grad @ torch.linalg.solve(A, theta)


def _zeros() -> Dict[str, Tensor]:
    return {"w": torch.zeros(DIM, dtype=DTYPE)}


def _ridge_loss(solver: str, inner_fn: Callable[..., Tensor] = _ridge, **options: Any) -> Callable[..., Any]:
    optimizer, K, iterations = RIDGE_SETUPS[solver]
    options = {"optimizer": optimizer, "outer_fn": _validation, "solver": solver, "iterations": iterations,
               "tol": 1e-14, **options}
    return unroll.implicit_loss(inner_fn, K, **options)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("where", ["args", "closed_over", "param_dict"])
def test_ridge_hypergradient_matches_closed_form(solver: str, where: str) -> None:
    X, y, Xv, yv = _data()
    lam = torch.tensor(LOG_WD, dtype=DTYPE).exp()
    theta_star, expected = _closed_form(lam, X, y, Xv, yv)
    expected_log = expected * lam  # d/d log(lam)
    params = {"w": torch.zeros(DIM, dtype=DTYPE, requires_grad=True)}
    optimizer = RIDGE_SETUPS[solver][0]
    phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
    if where == "args":
        value = _ridge_loss(solver)(params, optimizer.init(params), phi, X, y, outer_args=(Xv, yv))
        value.backward()
        gradient = phi.grad
    elif where == "closed_over":
        surrogate = _ridge_loss(solver, lambda p, X, y: _ridge(p, phi, X, y))
        value = surrogate(params, optimizer.init(params), X, y, outer_args=(Xv, yv))
        value.backward()
        gradient = phi.grad
    else:
        surrogate = _ridge_loss(solver, lambda p, h, X, y: _ridge(p, h["log_wd"], X, y))
        gradient = torch.func.grad(lambda h: surrogate(params, optimizer.init(params), h, X, y,
                                                       outer_args=(Xv, yv)))({"log_wd": phi.detach()})["log_wd"]
        value = surrogate(params, optimizer.init(params), {"log_wd": phi}, X, y, outer_args=(Xv, yv))
    assert gradient is not None
    torch.testing.assert_close(value, _validation({"w": theta_star}, Xv, yv), rtol=0, atol=1e-12)
    torch.testing.assert_close(gradient, expected_log, rtol=0, atol=1e-8)
    assert abs(float(expected_log)) > 0.1  # a gradient that can be wrong
    # theta* does not depend on the starting point: no gradient reaches the initial params.
    assert params["w"].grad is None


@pytest.mark.parametrize("solver", SOLVERS)
def test_torch_func_grad_matches_backward(solver: str) -> None:
    X, y, Xv, yv = _data(1)
    params = _zeros()
    state = RIDGE_SETUPS[solver][0].init(params)

    def value_of(phi: Tensor) -> Tensor:
        surrogate = _ridge_loss(solver, lambda p, X, y: _ridge(p, phi, X, y))
        return surrogate(params, state, X, y, outer_args=(Xv, yv))

    by_func = torch.func.grad(value_of)(torch.tensor(LOG_WD, dtype=DTYPE))
    phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
    value_of(phi).backward()
    assert phi.grad is not None
    torch.testing.assert_close(by_func, phi.grad, rtol=1e-12, atol=1e-14)


def test_vmap_is_refused_clearly() -> None:
    X, y, Xv, yv = _data()
    params, optimizer = _zeros(), unroll.sgd(0.3)
    surrogate = unroll.implicit_loss(_ridge, 5, optimizer=optimizer, outer_fn=_validation)
    with pytest.raises(RuntimeError, match="cannot run under torch.func.vmap"):
        torch.func.vmap(lambda phi: surrogate(params, optimizer.init(params), phi, X, y, outer_args=(Xv, yv)))(
            torch.tensor([0.1, 0.2], dtype=DTYPE))


def _logistic(params: Dict[str, Tensor], log_wd: Tensor, X: Tensor, labels: Tensor) -> Tensor:
    w = params["w"]
    return (nn.functional.binary_cross_entropy_with_logits(X @ w + params["b"], labels)
            + 0.5 * log_wd.exp() * w.pow(2).sum())


def _logistic_data() -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 4, generator=gen, dtype=DTYPE)
    labels = (X @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=DTYPE) + torch.randn(40, generator=gen, dtype=DTYPE)
              > 0).to(DTYPE)
    Xv = torch.randn(30, 4, generator=gen, dtype=DTYPE)
    return X, labels, Xv, (Xv[:, 0] - Xv[:, 1] > 0).to(DTYPE)


def _validation_logistic(params: Dict[str, Tensor], Xv: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(Xv @ params["w"] + params["b"], labels)


def test_logistic_regression_matches_long_unroll() -> None:
    """L2-regularised logistic regression (weight decay 0.1, curvature <= 0.1 + 0.25 ||X||^2 / n): SGD at lr 1
    contracts by about 0.9 per step, so the exact unroll of 400 steps has converged (its gradient to ~1e-14)."""
    X, labels, Xv, labels_v = _logistic_data()
    params = {"w": torch.zeros(4, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}
    optimizer = unroll.sgd(1.0)
    phi = torch.tensor(math.log(0.1), dtype=DTYPE, requires_grad=True)
    unrolled = unroll.surrogate_loss(_logistic, 400, optimizer=optimizer, outer_fn=_validation_logistic)
    (reference,) = torch.autograd.grad(unrolled(params, optimizer.init(params), phi, X, labels,
                                                outer_args=(Xv, labels_v)), phi)
    assert abs(float(reference)) > 0.01
    for solver in SOLVERS:
        surrogate = unroll.implicit_loss(_logistic, 300, optimizer=optimizer, outer_fn=_validation_logistic,
                                         solver=solver, iterations=400, tol=1e-13, return_info=True)
        value, info = surrogate(params, optimizer.init(params), phi, X, labels, outer_args=(Xv, labels_v))
        (gradient,) = torch.autograd.grad(value, phi)
        assert info.stationarity < 1e-12 and info.residual < 1e-12, info
        torch.testing.assert_close(gradient, reference, rtol=0, atol=1e-10, msg=solver)


def test_fixed_point_differentiates_tensor_weight_decay_and_lr() -> None:
    """Weight decay lam in the optimizer (inner_fn without penalty): theta* is the ridge solution, d outer/d lam
    the closed form, and d outer/d lr = 0 (the fixed point does not depend on the step size)."""
    X, y, Xv, yv = _data(2)
    lam = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    optimizer = unroll.sgd(lr, weight_decay=lam)
    params = _zeros()
    surrogate = unroll.implicit_loss(_least_squares, 500, optimizer=optimizer,
                                     outer_fn=_validation, solver="fixed_point", iterations=1000, tol=1e-14)
    lam_grad, lr_grad = torch.autograd.grad(surrogate(params, optimizer.init(params), X, y, outer_args=(Xv, yv)),
                                            (lam, lr))
    _, expected = _closed_form(lam.detach(), X, y, Xv, yv)
    torch.testing.assert_close(lam_grad, expected, rtol=0, atol=1e-8)
    assert abs(float(lr_grad)) < 1e-12
    # The long exact unroll agrees (its gradient still carries a small transient in lr, not in lam).
    unrolled = unroll.surrogate_loss(_least_squares, 500, optimizer=optimizer,
                                     outer_fn=_validation)
    (unrolled_grad,) = torch.autograd.grad(unrolled(params, optimizer.init(params), X, y, outer_args=(Xv, yv)), lam)
    torch.testing.assert_close(lam_grad, unrolled_grad, rtol=0, atol=1e-8)
    for solver in ("cg", "neumann"):
        with pytest.raises(ValueError, match="weight_decay.*put the penalty in inner_fn"):
            unroll.implicit_loss(_ridge, 10, optimizer=optimizer, solver=solver)


def test_adam_inner_optimizer_with_cg() -> None:
    """theta* reached by Adam; the IFT gradient's error is of the order of the stationarity ||grad L(theta_K)||
    (d hypergradient / d theta is O(1) here): tolerance 10 x stationarity, which must itself be small."""
    X, y, Xv, yv = _data()
    optimizer = unroll.adam(0.02)
    params = _zeros()
    phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
    surrogate = unroll.implicit_loss(_ridge, 1000, optimizer=optimizer, outer_fn=_validation, solver="cg",
                                     return_info=True)
    value, info = surrogate(params, optimizer.init(params), phi, X, y, outer_args=(Xv, yv))
    (gradient,) = torch.autograd.grad(value, phi)
    lam = phi.detach().exp()
    _, expected = _closed_form(lam, X, y, Xv, yv)
    assert info.stationarity < 1e-5, info
    assert abs(float(gradient - expected * lam)) <= 10 * float(info.stationarity)


def test_info_reports_residual_stationarity_and_iterations() -> None:
    X, y, Xv, yv = _data()
    lam = math.exp(LOG_WD)
    H = X.T @ X + lam * torch.eye(DIM, dtype=DTYPE)
    params = _zeros()
    optimizer = unroll.sgd(0.3)

    def info_of(K: int, **options: Any) -> unroll.ImplicitInfo:
        surrogate = unroll.implicit_loss(_ridge, K, optimizer=optimizer, outer_fn=_validation, return_info=True,
                                         **options)
        return surrogate(params, optimizer.init(params), torch.tensor(LOG_WD), X, y, outer_args=(Xv, yv))[1]

    # K = 0: theta* = 0, where grad L = -X^T y and grad outer = -Xv^T yv.
    b = -Xv.T @ yv
    one_step = info_of(0, solver="cg", iterations=1)
    v1 = (b @ b) / (b @ H @ b) * b  # one conjugate-gradient step from 0
    assert one_step.iterations == 1 and one_step.solver == "cg"
    torch.testing.assert_close(one_step.residual, (H @ v1 - b).norm() / b.norm(), rtol=1e-10, atol=0)
    assert one_step.residual > 1e-2
    torch.testing.assert_close(one_step.stationarity, (X.T @ y).norm(), rtol=1e-12, atol=0)
    converged = info_of(150, solver="cg")
    assert converged.residual < 1e-12 and converged.stationarity < 1e-12 and converged.iterations <= DIM + 2
    # Neumann: the residual after n terms is (I - aH)^n b exactly, so the count is the first n reaching tol.
    step, tol = 0.3, 1e-6
    powers = [torch.linalg.matrix_power(torch.eye(DIM, dtype=DTYPE) - step * H, n) @ b for n in range(200)]
    first = next(n for n, r in enumerate(powers) if r.norm() <= tol * b.norm())
    neumann = info_of(0, solver="neumann", tol=tol, step_size=step)
    assert neumann.iterations == first
    torch.testing.assert_close(neumann.residual, powers[first].norm() / b.norm(), rtol=1e-8, atol=0)
    capped = info_of(150, solver="fixed_point", iterations=7, tol=0.0)
    assert capped.iterations == 7 and capped.residual > 1e-3 and capped.stationarity < 1e-12


def test_fixed_point_uses_the_final_optimizer_state() -> None:
    """Adagrad's update at its final state is theta - lr g / sqrt(G*): a non-symmetric Jacobian I - lr D H, with D
    from the accumulated squares G* (a fresh state would make the map a sign step). The fixed point is the ridge
    solution whatever D, so the hypergradient is the closed form."""
    X, y, Xv, yv = _data()
    optimizer = unroll.adagrad(1.0)
    params = _zeros()
    phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
    surrogate = unroll.implicit_loss(_ridge, 400, optimizer=optimizer, outer_fn=_validation, solver="fixed_point",
                                     iterations=500, tol=1e-14)
    (gradient,) = torch.autograd.grad(surrogate(params, optimizer.init(params), phi, X, y, outer_args=(Xv, yv)), phi)
    lam = phi.detach().exp()
    torch.testing.assert_close(gradient, _closed_form(lam, X, y, Xv, yv)[1] * lam, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver, options", [
    # 2 / lambda_max(H) is about 0.72: at step 2 the series (I - aH)^n b grows.
    ("neumann", dict(K=150, optimizer=unroll.sgd(0.3), step_size=2.0, iterations=50)),
    # Once Adam has converged (1000 steps), its step lr / sqrt(v*) at the final state is far too long for the
    # frozen update map to contract (after 300 steps it still does, slowly).
    ("fixed_point", dict(K=1000, optimizer=unroll.adam(0.02), iterations=50)),
])
def test_diverging_solve_is_reported(solver: str, options: Dict[str, Any]) -> None:
    X, y, Xv, yv = _data()
    params = _zeros()
    surrogate = unroll.implicit_loss(_ridge, outer_fn=_validation, solver=solver, **options)
    with pytest.raises(FloatingPointError, match=f"the {solver} solve for the implicit gradient diverged"):
        surrogate(params, options["optimizer"].init(params), torch.tensor(LOG_WD), X, y, outer_args=(Xv, yv))
    unchecked = unroll.implicit_loss(_ridge, outer_fn=_validation, solver=solver, check_finite=False,
                                     return_info=True, **options)
    info = unchecked(params, options["optimizer"].init(params), torch.tensor(LOG_WD), X, y, outer_args=(Xv, yv))[1]
    assert info.residual > 1


class Scaled(nn.Module):
    """A bias-free linear map whose output is multiplied by a (non-trainable) buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, 1, bias=False, dtype=DTYPE)
        self.register_buffer("scale", torch.tensor(2.0, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.linear(x).squeeze(-1)


def test_module_with_buffer_and_no_mutation() -> None:
    """The module computes 2 X w: ridge on 2 X; params, state, args and buffers are left untouched, and two calls
    give bit-identical values and gradients."""
    X, y, Xv, yv = _data()
    net = Scaled()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    optimizer = unroll.sgd(0.05, momentum=0.5)

    def inner(mapping: Dict[str, Tensor], log_wd: Tensor, X: Tensor, y: Tensor) -> Tensor:
        fit = functional_call(net, mapping, (X,), strict=True)
        return 0.5 * (fit - y).pow(2).sum() + 0.5 * log_wd.exp() * mapping["linear.weight"].pow(2).sum()

    def outer(mapping: Dict[str, Tensor], Xv: Tensor, yv: Tensor) -> Tensor:
        return 0.5 * (functional_call(net, mapping, (Xv,), strict=True) - yv).pow(2).sum()

    surrogate = unroll.implicit_loss(inner, 600, optimizer=optimizer, outer_fn=outer, solver="cg")
    state = optimizer.init(params)
    inputs = (params, state, X, y, Xv, yv, buffers)
    before = [torch.utils._pytree.tree_map(torch.clone, item) for item in inputs]
    results = []
    for _ in range(2):
        phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
        value = surrogate(params, state, phi, X, y, buffers=buffers, outer_args=(Xv, yv))
        value.backward()
        assert phi.grad is not None
        results.append((value.detach(), phi.grad))
    lam = math.exp(LOG_WD)
    theta, expected = _closed_form(torch.tensor(lam, dtype=DTYPE), 2 * X, y, 2 * Xv, yv)
    torch.testing.assert_close(results[0][0], 0.5 * (2 * Xv @ theta - yv).pow(2).sum(), rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], expected * lam, rtol=0, atol=1e-8)
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    for item, copy in zip(inputs, before):
        leaves = zip(torch.utils._pytree.tree_leaves(item), torch.utils._pytree.tree_leaves(copy))
        assert all(torch.equal(a, b) for a, b in leaves)


def test_second_derivatives_hold_the_solution_fixed() -> None:
    """As documented: second derivatives treat theta* and v as constants. For ridge in phi = log lam the carrier
    term is -lam <theta*, v> (+ a constant), so the second derivative equals the first one, not the derivative of
    the hypergradient (checked by central finite differences)."""
    X, y, Xv, yv = _data()
    phi = torch.tensor(LOG_WD, dtype=DTYPE, requires_grad=True)
    params = _zeros()
    surrogate = _ridge_loss("cg")
    value = surrogate(params, RIDGE_SETUPS["cg"][0].init(params), phi, X, y, outer_args=(Xv, yv))
    (first,) = torch.autograd.grad(value, phi, create_graph=True)
    (second,) = torch.autograd.grad(first, phi)
    torch.testing.assert_close(second, first.detach(), rtol=1e-12, atol=0)

    def hypergradient(log_lam: float) -> Tensor:
        lam = torch.tensor(log_lam, dtype=DTYPE).exp()
        return _closed_form(lam, X, y, Xv, yv)[1] * lam

    h = 1e-5
    true_second = (hypergradient(LOG_WD + h) - hypergradient(LOG_WD - h)) / (2 * h)
    assert abs(float(true_second - second)) > 0.1


class CountingRidge:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, params: Dict[str, Tensor], *args: Any) -> Tensor:
        self.calls += 1
        return _ridge(params, *args)


BAD_OPTIONS = [
    (dict(solver="newton"), ValueError, "solver must be one of 'cg', 'neumann', 'fixed_point'"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(iterations=2.5), TypeError, "iterations"),
    (dict(iterations=True), TypeError, "iterations"),
    (dict(tol="small"), TypeError, "tol"),
    (dict(tol=-1e-3), ValueError, "tol"),
    (dict(tol=float("nan")), ValueError, "tol"),
    (dict(solver="neumann", step_size=0.0), ValueError, "step_size"),
    (dict(solver="neumann", step_size=-0.1), ValueError, "step_size"),
    (dict(solver="cg", step_size=0.1), ValueError, "step_size"),
    (dict(K=-1), ValueError, "K"),
    (dict(K=1.5), TypeError, "K"),
    (dict(optimizer=unroll.sgd(0.1, weight_decay=0.1)), ValueError, "weight_decay"),
    (dict(optimizer=unroll.adamw(0.1), solver="neumann"), ValueError, "weight_decay"),
    (dict(optimizer=unroll.param_groups({"w": unroll.sgd(0.1, weight_decay=1e-3)})), ValueError, "weight_decay"),
    (dict(optimizer=unroll.param_groups({"w": unroll.sgd(0.1)}), solver="neumann"), ValueError, "step_size"),
    (dict(optimizer=torch.optim.SGD), TypeError, "optimizer"),
    (dict(outer_fn=3), TypeError, "outer_fn"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_bad_arguments_refused_before_any_work(options: Dict[str, Any], error: type, message: str) -> None:
    inner = CountingRidge()
    options = {"K": 5, "optimizer": unroll.sgd(0.1), **options}
    with pytest.raises(error, match=message):
        unroll.implicit_loss(inner, options.pop("K"), **options)
    assert inner.calls == 0


def test_bad_call_arguments_refused_before_any_work() -> None:
    X, y, Xv, yv = _data()
    inner = CountingRidge()
    params, optimizer = _zeros(), unroll.sgd(0.1)
    state = optimizer.init(params)
    with_outer = unroll.implicit_loss(inner, 5, optimizer=optimizer, outer_fn=_validation)
    with pytest.raises(TypeError, match="outer_args must be a tuple"):
        with_outer(params, state, LOG_WD, X, y, outer_args=[Xv, yv])
    with pytest.raises(ValueError, match="outer_args needs an outer_fn"):
        unroll.implicit_loss(inner, 5, optimizer=optimizer)(params, state, LOG_WD, X, y, outer_args=(Xv, yv))
    with pytest.raises(KeyError, match="share the names"):
        with_outer(params, state, LOG_WD, X, y, buffers={"w": torch.ones(1)})
    with pytest.raises(KeyError, match="state"):
        with_outer(params, {"step": torch.zeros(()), "momentum_buffer": {}}, LOG_WD, X, y)
    with pytest.raises(TypeError, match="inner_fn must be callable"):
        unroll.implicit_loss(3, 5, optimizer=optimizer)  # type: ignore[call-overload]
    assert inner.calls == 0
