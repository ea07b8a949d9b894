"""Tests of ``unroll.es_gradient`` and ``unroll.pes`` (Vicol, Metz & Sohl-Dickstein, ICML 2021).

Statistical claims are checked on problems whose smoothed gradients are known in closed form (a quadratic loss, an
inner SGD whose total outer loss is quadratic in phi), against the exact gradient from autograd through
``unroll.surrogate_loss``, with fixed generator seeds so that every run sees the same numbers. Exact claims (the
estimator's formula and constant, the carried state) are checked against independent computations from the noise
the estimator drew. Everything is float64.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor

import unroll

DTYPE = torch.float64
Params = Dict[str, Tensor]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(grads: Params) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def assert_trees_equal(a: Any, b: Any, atol: float = 0.0) -> None:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    assert spec_a == spec_b
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, Tensor):
            torch.testing.assert_close(x, y, rtol=0.0, atol=atol)
        else:
            assert x == y


def autograd_grad(loss_of_phi: Callable[[Params], Tensor], phi: Params) -> Tensor:
    leaves = {n: p.detach().clone().requires_grad_() for n, p in phi.items()}
    return flat(dict(zip(leaves, torch.autograd.grad(loss_of_phi(leaves), list(leaves.values())))))


# ---------------------------------------------------------------------------------------------------------------
# es_gradient on a quadratic: f(phi) = 0.5 phi^T A phi + b^T phi + c, whose smoothed gradient is A phi + b
# ---------------------------------------------------------------------------------------------------------------

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 1.5]], dtype=DTYPE)
B = torch.tensor([1.0, -1.0, 0.5], dtype=DTYPE)
PHI_Q = {"x": torch.tensor([0.3, -0.2], dtype=DTYPE), "y": torch.tensor(0.7, dtype=DTYPE)}


def quadratic(phi: Params) -> Tensor:
    v = torch.cat([phi["x"], phi["y"].reshape(1)])
    return 0.5 * v @ A @ v + B @ v + 3.0  # the constant makes a plain (not antithetic) estimate noisier


def estimates(estimate: Callable[..., Tuple[Params, Tensor]], seeds: range) -> Tensor:
    return torch.stack([flat(estimate(PHI_Q, gen(s))[0]) for s in seeds])


def test_es_gradient_is_unbiased_and_its_standard_error_falls_as_one_over_root_particles() -> None:
    v = torch.cat([PHI_Q["x"], PHI_Q["y"].reshape(1)])
    exact = A @ v + B
    spreads = {}
    for particles in (4, 64):
        runs = estimates(unroll.es_gradient(quadratic, sigma=0.1, particles=particles), range(300))
        se = runs.std(0) / math.sqrt(len(runs))
        assert ((runs.mean(0) - exact).abs() < 4 * se).all(), (runs.mean(0), exact, se)
        spreads[particles] = runs.std(0)
    ratio = spreads[4] / spreads[64]  # sqrt(64 / 4) = 4 expected
    assert ((ratio > 3.3) & (ratio < 4.8)).all(), ratio
    plain = estimates(unroll.es_gradient(quadratic, sigma=0.1, particles=64, antithetic=False), range(300))
    plain_se = plain.std(0) / math.sqrt(len(plain))
    assert ((plain.mean(0) - exact).abs() < 4 * plain_se).all(), (plain.mean(0), exact, plain_se)
    assert (plain.std(0) > 5 * spreads[64]).all()  # f(phi)/sigma enters every plain term; pairs cancel it


def test_es_gradient_pairs_cancel_even_orders_so_a_quadratic_reads_like_its_tangent() -> None:
    """f(phi + eps) - f(phi - eps) = 2 eps . grad f(phi) for a quadratic: the same noise gives the same estimate
    as the linear tangent l(p) = grad f(phi) . p, which is still not grad f(phi) itself (exact only on average)."""
    v = torch.cat([PHI_Q["x"], PHI_Q["y"].reshape(1)])
    slope = A @ v + B

    def tangent(phi: Params) -> Tensor:
        return slope @ torch.cat([phi["x"], phi["y"].reshape(1)])

    for seed in range(3):
        g_quadratic = unroll.es_gradient(quadratic, sigma=0.3, particles=8)(PHI_Q, gen(seed))[0]
        g_tangent = unroll.es_gradient(tangent, sigma=0.3, particles=8)(PHI_Q, gen(seed))[0]
        assert_trees_equal(g_quadratic, g_tangent, atol=1e-12)
        assert (flat(g_tangent) - slope).abs().max() > 1e-2


def test_es_gradient_formula_and_constant_from_the_noise_it_drew() -> None:
    """Record every perturbed phi (vmap=False passes plain tensors), rebuild g = sum_i eps_i f_i / (N sigma^2)."""
    seen: List[Params] = []

    def f(phi: Params) -> Tensor:
        return torch.sin(phi["x"]).sum() * phi["y"] + phi["y"] ** 3

    def recording(phi: Params) -> Tensor:
        seen.append({n: p.clone() for n, p in phi.items()})
        return f(phi)

    sigma, particles = 0.2, 6
    grads, loss = unroll.es_gradient(recording, sigma=sigma, particles=particles, vmap=False)(PHI_Q, gen(7))
    assert len(seen) == particles
    eps = [{n: p[n] - PHI_Q[n] for n in p} for p in seen]
    for i in range(particles // 2):  # antithetic: particle i + N/2 is particle i mirrored
        assert_trees_equal(eps[i + particles // 2], {n: -e for n, e in eps[i].items()}, atol=1e-15)
    values = [f(p) for p in seen]
    expected = {n: sum(e[n] * f for e, f in zip(eps, values)) / (particles * sigma ** 2) for n in PHI_Q}
    assert_trees_equal(grads, expected, atol=1e-12)
    torch.testing.assert_close(loss, torch.stack(values).mean(), rtol=0.0, atol=1e-12)


def test_es_gradient_same_seed_same_numbers_vmap_or_loop() -> None:
    def f(phi: Params) -> Tensor:
        return torch.tanh(phi["x"]).pow(2).sum() + torch.exp(phi["y"])

    for antithetic in (True, False):
        batched = unroll.es_gradient(f, sigma=0.1, particles=6, antithetic=antithetic)
        looped = unroll.es_gradient(f, sigma=0.1, particles=6, antithetic=antithetic, vmap=False)
        first = batched(PHI_Q, gen(3))
        assert_trees_equal(first, batched(PHI_Q, gen(3)))
        assert_trees_equal(first, looped(PHI_Q, gen(3)), atol=1e-12)
        assert not torch.equal(flat(first[0]), flat(batched(PHI_Q, gen(4))[0]))


# ---------------------------------------------------------------------------------------------------------------
# PES on an unrolled problem whose mean outer loss over the horizon is quadratic in phi
# ---------------------------------------------------------------------------------------------------------------

OPT = unroll.sgd(0.1)
H, T = 20, 5
TARGET_W = torch.tensor([1.0, -2.0], dtype=DTYPE)
THETA0 = {"w": torch.zeros(2, dtype=DTYPE), "b": torch.tensor(0.2, dtype=DTYPE)}
PHI = {"w": torch.tensor([0.5, 0.5], dtype=DTYPE), "b": torch.tensor(-0.3, dtype=DTYPE)}


def inner(theta: Params, phi: Params) -> Tensor:
    """SGD on it pulls theta towards phi / 1.5: theta^k is affine in the phis of all earlier steps."""
    pull = 0.5 * ((theta["w"] - phi["w"]) ** 2).sum() + 0.5 * (theta["b"] - phi["b"]) ** 2
    return pull + 0.25 * ((theta["w"] ** 2).sum() + theta["b"] ** 2)


def outer(theta: Params, phi: Params) -> Tensor:
    return 0.5 * ((theta["w"] - TARGET_W) ** 2).sum() + 0.5 * (theta["b"] - 0.5) ** 2 + 0.3 * theta["w"][0] * theta["b"]


def exact_gradient() -> Tensor:
    """The gradient of the mean of outer over theta^1..theta^H (Gaussian smoothing leaves a quadratic's alone)."""
    total = unroll.surrogate_loss(inner, H, optimizer=OPT, outer_fn=outer, average_over_steps=True)
    return autograd_grad(lambda phi: total(THETA0, OPT.init(THETA0), phi), PHI)


def truncated_backprop_gradient() -> Tensor:
    """Each window's exact gradient with its start (carried with the unperturbed phi) detached, averaged."""
    window = unroll.surrogate_loss(inner, T, optimizer=OPT, outer_fn=outer, average_over_steps=True)
    advance = unroll.unrolled_params(inner, T, stop_grad=True, optimizer=OPT)
    params, state, total = THETA0, OPT.init(THETA0), torch.zeros(3, dtype=DTYPE)
    for _ in range(H // T):
        total += autograd_grad(lambda phi, p=params, s=state: window(p, s, phi), PHI)
        params, state = advance(params, state, PHI)
    return total / (H // T)


def horizon_averages(persistent: bool, seeds: range, particles: int) -> Tensor:
    """Per seed: the estimates of the H / T windows of one horizon, averaged."""
    estimator = unroll.pes(inner, T, optimizer=OPT, horizon=H, sigma=0.1, particles=particles, outer_fn=outer,
                           persistent=persistent)
    runs = []
    for seed in seeds:
        state, generator, total = estimator.init(THETA0, OPT.init(THETA0), PHI), gen(seed), torch.zeros(3, dtype=DTYPE)
        for _ in range(H // T):
            grads, state, _ = estimator.step(PHI, state, generator=generator)
            total += flat(grads)
        runs.append(total / (H // T))
    return torch.stack(runs)


def test_pes_is_unbiased_while_truncated_es_and_truncated_backprop_are_not() -> None:
    exact, truncated = exact_gradient(), truncated_backprop_gradient()
    assert (exact - truncated).abs().max() > 0.3  # the problem has a large truncation bias to detect
    for persistent, unbiased_for, biased_against in ((True, exact, truncated), (False, truncated, exact)):
        runs = horizon_averages(persistent, range(24), particles=128)
        mean, se = runs.mean(0), runs.std(0) / math.sqrt(len(runs))
        assert ((mean - unbiased_for).abs() < 4 * se).all(), (persistent, mean, unbiased_for, se)
        assert ((mean - biased_against).abs() / se).max() > 8, (persistent, mean, biased_against, se)


def window_losses_by_hand(starts: List[Tuple[Params, Any]], phis: List[Params]) -> Tensor:
    window = unroll.surrogate_loss(inner, T, optimizer=OPT, outer_fn=outer, average_over_steps=True)
    return torch.stack([window(p, s, phi) for (p, s), phi in zip(starts, phis)])


def test_pes_second_window_matches_the_paper_estimator_built_by_hand() -> None:
    """Window 2 of each particle from its own window-1 end (PES) or from the unperturbed end (truncated ES),
    scored with surrogate_loss; g = sum_i w_i L_i / (N sigma^2) with w = xi (PES) or the current eps (TES)."""
    sigma, particles = 0.3, 4
    make = [unroll.pes(inner, T, optimizer=OPT, horizon=H, sigma=sigma, particles=particles, outer_fn=outer,
                       persistent=persistent) for persistent in (True, False)]
    states = [m.init(THETA0, OPT.init(THETA0), PHI) for m in make]
    generators = [gen(11), gen(11)]
    first = [m.step(PHI, s, generator=g) for m, s, g in zip(make, states, generators)]
    second = [m.step(PHI, f[1], generator=g) for m, f, g in zip(make, first, generators)]
    xi1, xi2 = first[0][1].xi, second[0][1].xi  # the same seed draws the same noise in both modes
    eps1 = [{n: xi1[n][i] for n in PHI} for i in range(particles)]
    eps2 = [{n: xi2[n][i] - xi1[n][i] for n in PHI} for i in range(particles)]
    for i in range(particles // 2):
        assert_trees_equal(eps2[i + particles // 2], {n: -e for n, e in eps2[i].items()}, atol=1e-15)
    advance = unroll.unrolled_params(inner, T, stop_grad=True, optimizer=OPT)
    shifted = [{n: PHI[n] + e[n] for n in PHI} for e in eps2]
    own_ends = [advance(THETA0, OPT.init(THETA0), {n: PHI[n] + e[n] for n in PHI}) for e in eps1]
    shared_end = advance(THETA0, OPT.init(THETA0), PHI)
    for (grads, _, loss), weights, starts in ((second[0], xi2, own_ends), (second[1], None, [shared_end] * 4)):
        losses = window_losses_by_hand(starts, shifted)
        w = weights or {n: torch.stack([e[n] for e in eps2]) for n in PHI}
        expected = {n: torch.tensordot(losses, w[n], dims=1) / (particles * sigma ** 2) for n in PHI}
        assert_trees_equal(grads, expected, atol=1e-12)
        torch.testing.assert_close(loss, losses.mean(), rtol=0.0, atol=1e-12)
    ends_by_hand = [advance(*own_ends[i], shifted[i]) for i in range(particles)]
    assert_trees_equal(second[0][1].params, {n: torch.stack([e[0][n] for e in ends_by_hand]) for n in THETA0},
                       atol=1e-12)
    assert_trees_equal(second[1][1].params, {n: torch.stack([advance(*shared_end, PHI)[0][n]] * particles)
                                             for n in THETA0}, atol=1e-12)
    assert second[0][1].t == second[1][1].t == 2 * T
    assert all(torch.count_nonzero(x) == 0 for x in second[1][1].xi.values())


def test_one_window_horizon_is_es_on_the_window_surrogate() -> None:
    """horizon = T: PES, truncated ES and es_gradient of surrogate_loss (another unroll) agree for one seed."""
    window = unroll.surrogate_loss(inner, T, optimizer=OPT, outer_fn=outer, average_over_steps=True)
    es = unroll.es_gradient(lambda phi: window(THETA0, OPT.init(THETA0), phi), sigma=0.2, particles=6, vmap=False)
    expected = es(PHI, gen(5))
    for persistent in (True, False):
        estimator = unroll.pes(inner, T, optimizer=OPT, horizon=T, sigma=0.2, particles=6, outer_fn=outer,
                               persistent=persistent)
        grads, _, loss = estimator.step(PHI, estimator.init(THETA0, OPT.init(THETA0), PHI), generator=gen(5))
        assert_trees_equal((grads, loss), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Mechanics: seeds, vmap, resets, purity, arguments, non-finite values
# ---------------------------------------------------------------------------------------------------------------

X = torch.linspace(-1.0, 1.0, 6, dtype=DTYPE)
Y = torch.sin(2.0 * X)


def regression_inner(theta: Params, phi: Params, x: Tensor, y: Tensor, scale: float) -> Tensor:
    """A nonlinear inner loss with data in args and a non-tensor argument."""
    prediction = torch.tanh(theta["w"][0] * x + theta["b"]) * theta["w"][1]
    return scale * ((prediction - y) ** 2).mean() + torch.exp(phi["b"]) * (theta["w"] ** 2).sum()


def regression_outer(theta: Params, phi: Params, x: Tensor, y: Tensor, scale: float) -> Tensor:
    return ((torch.tanh(theta["w"][0] * x + theta["b"]) * theta["w"][1] - y) ** 2).mean() + phi["w"].sum() ** 2


THETA_R = {"w": torch.tensor([0.5, 1.0], dtype=DTYPE), "b": torch.tensor(0.1, dtype=DTYPE)}
ADAM = unroll.adam(0.05)


def run_two_steps(persistent: bool, vmap: bool, seed: int = 2, closed_over: bool = False) -> List[Any]:
    if closed_over:
        inner_fn: Callable[..., Tensor] = lambda th, ph: regression_inner(th, ph, X, Y, 2.0)  # noqa: E731
        outer_fn: Callable[..., Tensor] = lambda th, ph: regression_outer(th, ph, X, Y, 2.0)  # noqa: E731
        args: Tuple[Any, ...] = ()
    else:
        inner_fn, outer_fn, args = regression_inner, regression_outer, (X, Y, 2.0)
    estimator = unroll.pes(inner_fn, 2, optimizer=ADAM, horizon=6, sigma=0.1, particles=4, outer_fn=outer_fn,
                           persistent=persistent, vmap=vmap)
    state, generator, results = estimator.init(THETA_R, ADAM.init(THETA_R), PHI), gen(seed), []
    for _ in range(2):
        grads, state, loss = estimator.step(PHI, state, *args, generator=generator)
        results.append((grads, state, loss))
    return results


@pytest.mark.parametrize("persistent", [True, False])
def test_pes_same_seed_same_numbers_vmap_or_loop_args_or_closure(persistent: bool) -> None:
    batched = run_two_steps(persistent, vmap=True)
    assert_trees_equal(batched, run_two_steps(persistent, vmap=True))
    assert_trees_equal(batched, run_two_steps(persistent, vmap=False), atol=1e-12)
    assert_trees_equal(batched, run_two_steps(persistent, vmap=True, closed_over=True), atol=1e-12)
    assert not torch.equal(flat(batched[1][0]), flat(run_two_steps(persistent, vmap=True, seed=3)[1][0]))


def test_pes_resets_after_the_horizon() -> None:
    estimator = unroll.pes(inner, T, optimizer=OPT, horizon=2 * T, sigma=0.1, particles=4, outer_fn=outer)
    fresh = estimator.init(THETA0, OPT.init(THETA0), PHI)
    generator = gen(0)
    first_grads, state, _ = estimator.step(PHI, fresh, generator=generator)
    assert state.t == T and not torch.equal(state.params["w"], fresh.params["w"])
    _, state, _ = estimator.step(PHI, state, generator=generator)
    assert_trees_equal(state, fresh)  # t = 0, xi = 0, every particle back at (THETA0, its state)
    # After the reset a window sees what the first one saw: the same noise gives the same estimate.
    assert_trees_equal(estimator.step(PHI, state, generator=gen(0))[0], first_grads)


def test_pes_leaves_its_inputs_untouched_and_keeps_its_own_copies() -> None:
    params = {n: p.clone() for n, p in THETA_R.items()}
    opt_state = ADAM.init(params)
    phi = {n: p.clone().requires_grad_() for n, p in PHI.items()}
    snapshot = pytree.tree_map(lambda t: t.detach().clone(), (params, opt_state, phi))
    estimator = unroll.pes(regression_inner, 2, optimizer=ADAM, horizon=4, sigma=0.1, particles=2,
                           outer_fn=regression_outer)
    state = estimator.init(params, opt_state, phi)
    state_snapshot = pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, state)
    grads, new_state, _ = estimator.step(phi, state, X, Y, 1.0, generator=gen(0))
    assert_trees_equal((params, opt_state, {n: p.detach() for n, p in phi.items()}), snapshot)
    assert_trees_equal(state, state_snapshot)
    assert not any(g.requires_grad for g in grads.values()) and all(p.grad is None for p in phi.values())
    with torch.no_grad():
        params["w"].add_(1.0)  # the caller's later in-place update does not reach the reset copies
    assert torch.equal(new_state.initial_params["w"], THETA_R["w"])


class Counted:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, theta: Params, phi: Params) -> Tensor:
        self.calls += 1
        return inner(theta, phi)


GOOD = dict(optimizer=OPT, horizon=H, sigma=0.1, particles=4)


@pytest.mark.parametrize("change, error", [
    (dict(sigma=0.0), ValueError), (dict(sigma=-0.1), ValueError), (dict(sigma=math.nan), ValueError),
    (dict(sigma=math.inf), ValueError), (dict(sigma="0.1"), TypeError), (dict(sigma=True), TypeError),
    (dict(sigma=torch.tensor(0.1)), TypeError), (dict(particles=3), ValueError), (dict(particles=0), ValueError),
    (dict(particles=4.0), TypeError), (dict(particles=True), TypeError), (dict(T=0), ValueError),
    (dict(T=2.5), TypeError), (dict(horizon=3), ValueError), (dict(horizon=22), ValueError),
    (dict(horizon="20"), TypeError), (dict(outer_fn=3), TypeError), (dict(optimizer="sgd"), TypeError),
])
def test_pes_refuses_bad_options_before_any_call(change: Dict[str, Any], error: type) -> None:
    counted = Counted()
    options: Dict[str, Any] = {**GOOD, "T": T, **change}
    with pytest.raises(error):
        unroll.pes(counted, options.pop("T"), **options)
    assert counted.calls == 0


@pytest.mark.parametrize("call, error", [
    (lambda est, st: est.step([1.0], st, generator=gen(0)), TypeError),
    (lambda est, st: est.step({"w": torch.ones(2, dtype=torch.long), "b": PHI["b"]}, st, generator=gen(0)),
     TypeError),
    (lambda est, st: est.step({"w": PHI["w"]}, st, generator=gen(0)), KeyError),
    (lambda est, st: est.step({"w": torch.ones(3, dtype=DTYPE), "b": PHI["b"]}, st, generator=gen(0)), ValueError),
    (lambda est, st: est.step(PHI, st, generator=0), TypeError),
    (lambda est, st: est.step(PHI, tuple(st), generator=gen(0)), TypeError),
    (lambda est, st: est.step(PHI, st._replace(t=3), generator=gen(0)), ValueError),
    (lambda est, st: est.init(THETA0, {"exp_avg": {}}, PHI), KeyError),
    (lambda est, st: est.init(THETA0, OPT.init(THETA0), {"w": 1.0}), TypeError),
])
def test_pes_refuses_bad_calls_before_any_call(call: Callable[..., Any], error: type) -> None:
    counted = Counted()
    estimator = unroll.pes(counted, T, outer_fn=outer, **GOOD)  # type: ignore[arg-type]
    state = estimator.init(THETA0, OPT.init(THETA0), PHI)
    with pytest.raises(error):
        call(estimator, state)
    assert counted.calls == 0


@pytest.mark.parametrize("options, error", [
    (dict(sigma=0.0, particles=2), ValueError), (dict(sigma=math.nan, particles=2), ValueError),
    (dict(sigma=0.1, particles=3), ValueError), (dict(sigma=0.1, particles=1.5), TypeError),
    (dict(sigma=0.1, particles=0, antithetic=False), ValueError),
])
def test_es_gradient_refuses_bad_options_before_any_call(options: Dict[str, Any], error: type) -> None:
    calls: List[int] = []
    with pytest.raises(error):
        unroll.es_gradient(lambda phi: calls.append(1) or quadratic(phi), **options)
    estimate = unroll.es_gradient(lambda phi: calls.append(1) or quadratic(phi), sigma=0.1, particles=2, vmap=False)
    with pytest.raises(TypeError):
        estimate({"x": torch.ones(2, dtype=torch.long)}, gen(0))
    with pytest.raises(TypeError):
        estimate(PHI_Q, 0)  # type: ignore[arg-type]
    assert calls == []
    assert unroll.es_gradient(quadratic, sigma=0.1, particles=3, antithetic=False)(PHI_Q, gen(0))[1].isfinite()


def test_non_finite_values_are_reported() -> None:
    def blows_up(theta: Params, phi: Params) -> Tensor:
        return inner(theta, phi) / (phi["b"] > -0.3).to(DTYPE)  # inf for the particles with a negative perturbation

    estimator = unroll.pes(blows_up, T, outer_fn=outer, **GOOD)  # type: ignore[arg-type]
    with pytest.raises(unroll.NonFiniteLossError, match="inner_fn returned a non-finite loss .* step 0"):
        estimator.step(PHI, estimator.init(THETA0, OPT.init(THETA0), PHI), generator=gen(0))
    nan_outer = unroll.pes(inner, T, outer_fn=lambda th, ph: outer(th, ph) * math.nan, **GOOD)
    with pytest.raises(unroll.NonFiniteLossError, match="outer_fn"):
        nan_outer.step(PHI, nan_outer.init(THETA0, OPT.init(THETA0), PHI), generator=gen(0))
    with pytest.raises(FloatingPointError, match="loss_fn returned a non-finite value"):
        unroll.es_gradient(lambda phi: quadratic(phi) / 0.0, sigma=0.1, particles=2)(PHI_Q, gen(0))


def test_public_names() -> None:
    assert {"es_gradient", "pes", "PES", "PESState"} <= set(unroll.__all__)
