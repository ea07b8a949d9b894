"""Games beyond GANs: unroll.unrolled_game, unroll.extrapolated_surrogate_loss, and examples/games.

Everything is float64 so that gradients can be compared with central finite differences
(``torch.autograd.gradcheck``) and with hand-written references.
"""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from torch import Tensor

import common
import ipd
import unroll

ROOT = Path(__file__).resolve().parents[1]

DTYPE = torch.float64


def bilinear(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum()


def dirac_gan(theta: Tensor, psi: Tensor) -> Tensor:
    return torch.nn.functional.logsigmoid(psi * theta).sum()


def rule(name: str) -> common.Method:
    return next(m for m in common.methods() if m.name == name)


def start() -> Dict[str, Tensor]:
    return {"x": torch.tensor([1.0], dtype=DTYPE), "y": torch.tensor([1.0], dtype=DTYPE)}


# ---- the bilinear game: unrolling converges where gradient descent-ascent does not ----

def test_bilinear_unrolling_converges_where_simultaneous_gda_diverges(one_thread: None) -> None:
    lr = 0.2
    gda = common.run(rule("simultaneous GDA"), bilinear, start(), lr, iterations=300)
    look_ahead = common.run(rule("unrolled K=5"), bilinear, start(), lr, iterations=300)
    assert gda.iterations_to_tol is None and gda.distances[-1] > 100 * gda.distances[0]  # spirals out
    # ρ = 0.8 per iteration (docs/results/games/bilinear.md): 47 iterations from √2 to 1e-3.
    assert look_ahead.iterations_to_tol == 47


def test_bilinear_rates_match_the_spectral_radius(one_thread: None) -> None:
    """On a linear game the distance shrinks by exactly ρ per iteration once the slow mode dominates."""
    lr, z_star = 0.2, {"x": torch.zeros(1, dtype=DTYPE), "y": torch.zeros(1, dtype=DTYPE)}
    for name, radius in [("simultaneous GDA", (1 + lr ** 2) ** 0.5), ("alternating GDA", 1.0),
                         ("unrolled K=1", (1 - lr ** 2) ** 0.5)]:
        assert common.spectral_radius(rule(name), bilinear, z_star, lr) == pytest.approx(radius, abs=1e-8)


def test_stop_grad_one_step_look_ahead_is_alternating_gda() -> None:
    """With plain SGD, x's gradient at y^1 held constant is ∂f/∂x at y's next iterate: alternating GDA."""
    z = common.leaves({"x": torch.tensor([0.3], dtype=DTYPE), "y": torch.tensor([-0.7], dtype=DTYPE)})
    for f in (bilinear, dirac_gan):
        a = common.unrolled(f, 0.3, 1, stop_grad=True)(z)
        b = common.alternating(f, 0.3)(z)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-15)


# ---- the one-step extrapolation ----

def small_gan(mlp_params: Callable[..., Dict[str, Tensor]], mlp_forward: Callable[..., Tensor]):
    """A tiny GAN: D's BCE loss on real and fake samples; G's samples (a function of g) enter as args."""
    d, g = mlp_params([2, 6, 1], seed=1), mlp_params([3, 5, 2], seed=2)
    gen = torch.Generator().manual_seed(3)
    real, z = torch.randn(8, 2, generator=gen, dtype=DTYPE), torch.randn(8, 3, generator=gen, dtype=DTYPE)

    def d_loss(d_params: Dict[str, Tensor], real: Tensor, fake: Tensor) -> Tensor:
        logits = mlp_forward(d_params, torch.cat([real, fake]))
        labels = torch.cat([torch.ones(len(real), 1, dtype=DTYPE), torch.zeros(len(fake), 1, dtype=DTYPE)])
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    return d, g, real, z, d_loss


def g_grad(surrogate: Callable[..., Tensor], d: Dict[str, Tensor], state: unroll.State, g: Dict[str, Tensor],
           real: Tensor, z: Tensor, mlp_forward: Callable[..., Tensor]) -> Tensor:
    g = {n: t.detach().requires_grad_() for n, t in g.items()}
    value = surrogate(d, state, real, mlp_forward(g, z))
    return torch.cat([t.flatten() for t in torch.autograd.grad(value, list(g.values()))])


@pytest.mark.parametrize("optimizer", [unroll.sgd(0.1, momentum=0.9), unroll.adam(0.01, betas=(0.5, 0.999))])
def test_extrapolated_alpha_one_and_zero_are_k1_and_k0(mlp_params, mlp_forward, optimizer) -> None:
    d, g, real, z, d_loss = small_gan(mlp_params, mlp_forward)
    # A state that is not fresh, so the one-step response depends on G (see docs/api.md).
    state = optimizer.init(d)
    for _ in range(3):
        d, state = unroll.unrolled_params(d_loss, 1, optimizer=optimizer)(d, state, real, mlp_forward(g, z).detach())
    grads = {K: g_grad(unroll.surrogate_loss(d_loss, K, optimizer=optimizer), d, state, g, real, z, mlp_forward)
             for K in (0, 1)}
    for alpha, K in ((1.0, 1), (0.0, 0)):
        surrogate = unroll.extrapolated_surrogate_loss(d_loss, alpha, optimizer=optimizer)
        torch.testing.assert_close(g_grad(surrogate, d, state, g, real, z, mlp_forward), grads[K], rtol=0, atol=1e-14)
    assert (grads[1] - grads[0]).norm() > 1e-4 * grads[0].norm()  # the two gradients differ: the test can fail
    # Any alpha: g_0 + alpha (g_1 - g_0).
    surrogate = unroll.extrapolated_surrogate_loss(d_loss, 3.5, optimizer=optimizer)
    torch.testing.assert_close(g_grad(surrogate, d, state, g, real, z, mlp_forward),
                               grads[0] + 3.5 * (grads[1] - grads[0]), rtol=1e-10, atol=1e-12)


def test_extrapolated_alpha_k_is_k_steps_on_a_bilinear_game() -> None:
    """y^K = y + Kη Aᵀx is linear in K, so α = K gives the K-step look-ahead gradient exactly."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(3, 4, generator=gen, dtype=DTYPE)
    x0, y = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(4, generator=gen, dtype=DTYPE)

    def y_loss(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return -(x @ A @ p["y"])

    opt = unroll.sgd(0.3)

    def grad_x(surrogate: Callable[..., Tensor]) -> Tensor:
        x = x0.clone().requires_grad_()
        return torch.autograd.grad(surrogate({"y": y}, opt.init({"y": y}), x), x)[0]
    for K in (2, 5):
        torch.testing.assert_close(grad_x(unroll.extrapolated_surrogate_loss(y_loss, float(K), optimizer=opt)),
                                   grad_x(unroll.surrogate_loss(y_loss, K, optimizer=opt)), rtol=1e-12, atol=1e-12)


def test_extrapolated_alpha_tensor_gets_its_gradient() -> None:
    """d f_alpha / d alpha = f_1 - f_0, for learning alpha."""

    def y_loss(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return -(x * p["y"]).sum() - 0.5 * (p["y"] ** 2).sum()

    opt, y, x = unroll.sgd(0.5), {"y": torch.tensor([0.4], dtype=DTYPE)}, torch.tensor([1.5], dtype=DTYPE)
    alpha = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    value = unroll.extrapolated_surrogate_loss(y_loss, alpha, optimizer=opt)(y, opt.init(y), x)
    f = [unroll.surrogate_loss(y_loss, K, optimizer=opt)(y, opt.init(y), x) for K in (0, 1)]
    (d_alpha,) = torch.autograd.grad(value, alpha)
    torch.testing.assert_close(d_alpha, f[1] - f[0])


@pytest.mark.parametrize("alpha, error", [(float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError),
                                          (True, TypeError), (torch.ones(2), ValueError)])
def test_extrapolated_rejects_bad_alpha(alpha, error) -> None:
    with pytest.raises(error, match="alpha"):
        unroll.extrapolated_surrogate_loss(lambda p: p["w"].sum(), alpha, optimizer=unroll.sgd(0.1))


def test_extrapolated_rejects_k_and_average_over_steps() -> None:
    for option in ({"K": 2}, {"average_over_steps": True}):
        with pytest.raises(TypeError, match="fixes"):
            unroll.extrapolated_surrogate_loss(lambda p: p["w"].sum(), 1.0, optimizer=unroll.sgd(0.1), **option)


# ---- unrolled_game: symmetric and recursive unrolling ----

def mlp_game(mlp_params, mlp_forward):
    """A small nonlinear general-sum game: G's samples G(z), D's logits; each player has its own loss."""
    players = {"g": mlp_params([2, 4, 2], seed=4), "d": mlp_params([2, 5, 1], seed=5)}
    gen = torch.Generator().manual_seed(6)
    real, z = torch.randn(6, 2, generator=gen, dtype=DTYPE), torch.randn(6, 2, generator=gen, dtype=DTYPE)

    def d_loss(p: Dict[str, Dict[str, Tensor]], real: Tensor, z: Tensor) -> Tensor:
        fake = mlp_forward(p["g"], z)
        return (torch.nn.functional.softplus(-mlp_forward(p["d"], real)).mean()
                + torch.nn.functional.softplus(mlp_forward(p["d"], fake)).mean())

    def g_loss(p: Dict[str, Dict[str, Tensor]], real: Tensor, z: Tensor) -> Tensor:  # non-saturating
        return torch.nn.functional.softplus(-mlp_forward(p["d"], mlp_forward(p["g"], z))).mean()
    return players, {"g": g_loss, "d": d_loss}, (real, z)


OPTIMIZERS = {
    "adam": lambda names: unroll.adam(0.05, betas=(0.5, 0.9)),
    "nadam": lambda names: unroll.nadam(0.05),  # scalar buffer, not packable
    "param_groups": lambda names: unroll.param_groups(
        lambda name: unroll.sgd(0.1, momentum=0.9) if name.startswith("w") else unroll.rmsprop(0.01), names=names),
}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_unrolled_game_with_one_mover_is_unrolled_params(mlp_params, mlp_forward, kind) -> None:
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    opt = OPTIMIZERS[kind](list(players["d"]))
    game = unroll.unrolled_game({"d": losses["d"]}, 4, optimizers={"d": opt})

    def d_inner(d: Dict[str, Tensor], g: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        return losses["d"]({"g": g, "d": d}, real, z)

    g = {n: t.clone().requires_grad_() for n, t in players["g"].items()}
    end, states = game({"g": g, "d": players["d"]}, {"d": opt.init(players["d"])}, *args)
    ref, ref_state = unroll.unrolled_params(d_inner, 4, optimizer=opt)(players["d"], opt.init(players["d"]), g, *args)
    for name in ref:
        torch.testing.assert_close(end["d"][name], ref[name], rtol=1e-13, atol=1e-13)
    for buffer, per_name in ref_state.items():
        if isinstance(per_name, dict):
            for name in per_name:
                torch.testing.assert_close(states["d"][buffer][name], per_name[name], rtol=1e-13, atol=1e-13)
    assert end["g"] is not g and all(end["g"][n] is g[n] for n in g)  # the fixed player is passed through
    grads = torch.autograd.grad(sum(v.sum() for v in end["d"].values()), list(g.values()))
    ref_grads = torch.autograd.grad(sum(v.sum() for v in ref.values()), list(g.values()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_unrolled_game_steps_by_hand() -> None:
    """Two GDA steps on x·y from (1, 1), lr 0.5: simultaneous (Jacobi) and alternating (Gauss-Seidel)."""
    losses = {"x": lambda p: p["x"]["v"] * p["y"]["v"], "y": lambda p: -p["x"]["v"] * p["y"]["v"]}
    opt = unroll.sgd(0.5)
    one = torch.tensor(1.0, dtype=DTYPE)
    players, states = {"x": {"v": one}, "y": {"v": one}}, {"x": opt.init({"v": one}), "y": opt.init({"v": one})}
    together = unroll.unrolled_game(losses, 2, optimizers={"x": opt, "y": opt})(players, states)[0]
    # (1, 1) -> (0.5, 1.5) -> (-0.25, 1.75)
    assert (together["x"]["v"].item(), together["y"]["v"].item()) == (-0.25, 1.75)
    in_turn = unroll.unrolled_game(losses, 2, optimizers={"x": opt, "y": opt}, alternating=True)(players, states)[0]
    # x first: (1, 1) -> x 0.5, y 1.25 -> x -0.125, y 1.1875
    assert (in_turn["x"]["v"].item(), in_turn["y"]["v"].item()) == (-0.125, 1.1875)
    y_first = unroll.unrolled_game(losses, 1, optimizers={"y": opt, "x": opt}, alternating=True)(players, states)[0]
    assert (y_first["x"]["v"].item(), y_first["y"]["v"].item()) == (0.25, 1.5)


def double(tensor_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {n: t.detach().clone().requires_grad_() for n, t in tensor_dict.items()}


def test_symmetric_unrolling_gradient_matches_finite_differences(mlp_params, mlp_forward) -> None:
    """D's loss at G's look-ahead, d/dθ_D of d_loss(θ_G^K(θ_G, θ_D), θ_D): surrogate_loss with the roles swapped,
    and unrolled_game unrolling G only, against central finite differences (float64)."""
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    g_opt = unroll.sgd(0.3, momentum=0.5)

    def g_inner(g: Dict[str, Tensor], d: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        return losses["g"]({"g": g, "d": d}, real, z)

    def d_outer(g: Dict[str, Tensor], d: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        return losses["d"]({"g": g, "d": d}, real, z)

    swapped = unroll.surrogate_loss(g_inner, 3, optimizer=g_opt, outer_fn=d_outer)
    game = unroll.unrolled_game({"g": losses["g"]}, 3, optimizers={"g": g_opt})
    names = list(players["d"])

    def via_surrogate(*d_tensors: Tensor) -> Tensor:
        return swapped(players["g"], g_opt.init(players["g"]), dict(zip(names, d_tensors)), *args)

    def via_game(*d_tensors: Tensor) -> Tensor:
        d = dict(zip(names, d_tensors))
        end, _ = game({"g": players["g"], "d": d}, {"g": g_opt.init(players["g"])}, *args)
        return losses["d"]({"g": end["g"], "d": d}, *args)

    inputs = tuple(double(players["d"]).values())
    assert torch.autograd.gradcheck(via_surrogate, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(via_game, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(via_game(*inputs), via_surrogate(*inputs), rtol=1e-13, atol=1e-13)
    # The look-ahead changes D's gradient (the test can fail): compare with D's plain gradient.
    plain = torch.autograd.grad(losses["d"]({"g": players["g"], "d": dict(zip(names, inputs))}, *args), inputs)
    ahead = torch.autograd.grad(via_game(*inputs), inputs)
    assert max((a - b).abs().max() for a, b in zip(ahead, plain)) > 1e-3


@pytest.mark.parametrize("alternating", [False, True])
def test_recursive_unrolling_gradient_matches_finite_differences(mlp_params, mlp_forward, alternating) -> None:
    """G's loss at (θ_G, θ_D^K), θ_D^K from K joint steps of G and D, differentiated in θ_G through both."""
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    optimizers = {"g": unroll.sgd(0.2), "d": unroll.adam(0.05, betas=(0.5, 0.9))}
    game = unroll.unrolled_game(losses, 2, optimizers=optimizers, alternating=alternating)
    # A non-fresh Adam state: one Adam step from zero moves by about lr·sign(g), whose derivative is ~0.
    d_state = optimizers["d"].init(players["d"])
    d_state = {**d_state, "step": torch.tensor(5.0, dtype=DTYPE),
               "exp_avg_sq": {n: torch.full_like(t, 0.3) for n, t in players["d"].items()}}
    states = {"g": optimizers["g"].init(players["g"]), "d": d_state}
    names = list(players["g"])

    def recursive(*g_tensors: Tensor) -> Tensor:
        g = dict(zip(names, g_tensors))
        end, _ = game({"g": g, "d": players["d"]}, states, *args)
        return losses["g"]({"g": g, "d": end["d"]}, *args)

    assert torch.autograd.gradcheck(recursive, tuple(double(players["g"]).values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_unrolled_game_composes_with_torch_func(mlp_params, mlp_forward) -> None:
    """torch.func.grad gives autograd's gradient; vmap over two starting points gives each one's result."""
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    optimizers = {"g": unroll.sgd(0.2), "d": unroll.sgd(0.3)}
    game = unroll.unrolled_game(losses, 2, optimizers=optimizers)
    states = {p: optimizers[p].init(players[p]) for p in optimizers}

    def g_loss(g: Dict[str, Tensor], d: Dict[str, Tensor]) -> Tensor:
        end, _ = game({"g": g, "d": d}, states, *args)
        return losses["g"]({"g": g, "d": end["d"]}, *args)

    by_func = torch.func.grad(g_loss)(players["g"], players["d"])
    g = double(players["g"])
    by_autograd = dict(zip(g, torch.autograd.grad(g_loss(g, players["d"]), list(g.values()))))
    for name in g:
        torch.testing.assert_close(by_func[name], by_autograd[name], rtol=1e-12, atol=1e-13)
    shifted = {n: t + 0.1 for n, t in players["g"].items()}
    stacked = {n: torch.stack([players["g"][n], shifted[n]]) for n in players["g"]}
    batched = torch.func.vmap(torch.func.grad(g_loss), in_dims=(0, None))(stacked, players["d"])
    alone = torch.func.grad(g_loss)(shifted, players["d"])
    for name in alone:
        torch.testing.assert_close(batched[name][1], alone[name], rtol=1e-12, atol=1e-13)


def test_unrolled_game_stop_grad_and_no_mutation(mlp_params, mlp_forward) -> None:
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    optimizers = {"g": unroll.sgd(0.2, momentum=0.9), "d": unroll.sgd(0.3)}
    states = {p: optimizers[p].init(players[p]) for p in optimizers}
    g = double(players["g"])
    before = {p: {n: t.detach().clone() for n, t in players[p].items()} for p in players}
    end, new_states = unroll.unrolled_game(losses, 3, True, optimizers=optimizers)({"g": g, "d": players["d"]},
                                                                                  states, *args)
    assert all(not t.requires_grad for p in end.values() for t in p.values())
    assert not new_states["g"]["momentum_buffer"]["w0"].requires_grad
    for p in players:
        for n, t in players[p].items():
            assert torch.equal(t.detach(), before[p][n])
    assert states["g"]["step"].item() == 0 and new_states["g"]["step"].item() == 3


def test_unrolled_game_stop_grad_records_no_graph_to_tensor_hyperparameters() -> None:
    """Under stop_grad every step is a constant: a learning rate that requires grad must not reach the result (it
    did when the optimizer's update ran with autograd on), while the tracked game still differentiates it."""
    lr = torch.tensor(0.1, dtype=DTYPE, requires_grad=True)
    losses = {"d": lambda p: -bilinear(p["g"]["x"], p["d"]["y"]) + p["d"]["y"].pow(2).sum()}
    players = {"g": {"x": torch.tensor([1.5], dtype=DTYPE)}, "d": {"y": torch.tensor([0.5], dtype=DTYPE)}}
    opt = unroll.sgd(lr)
    states = {"d": opt.init(players["d"])}
    constant, _ = unroll.unrolled_game(losses, 3, True, optimizers={"d": opt})(players, states)
    assert not constant["d"]["y"].requires_grad
    tracked, _ = unroll.unrolled_game(losses, 3, optimizers={"d": opt})(players, states)
    (lr_grad,) = torch.autograd.grad(tracked["d"]["y"].sum(), lr)
    # y_{k+1} = y_k - lr (2 y_k - x) is linear: y_K = x/2 + (1 - 2 lr)^K (y_0 - x/2).
    expected = 3 * (1 - 2 * 0.1) ** 2 * (-2) * (0.5 - 0.75)
    assert lr_grad.item() == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(constant["d"]["y"], tracked["d"]["y"].detach(), rtol=0, atol=0)


def test_unrolled_game_reports_a_nan_gradient_at_its_own_step_and_player() -> None:
    """A loss that is finite while its gradient is not (sqrt at 0) is named with its player and unrolled step."""
    losses = {"g": lambda p: (p["g"]["x"] * p["d"]["y"]).sum(),
              "d": lambda p: (p["d"]["y"] - 1.0).abs().sqrt().sum()}
    players = {"g": {"x": torch.tensor([1.0], dtype=DTYPE)}, "d": {"y": torch.tensor([1.0], dtype=DTYPE)}}
    opt = unroll.sgd(0.1)
    states = {p: opt.init(players[p]) for p in ("g", "d")}
    with pytest.raises(unroll.NonFiniteLossError, match=r"gradient of losses\['d'\] .* at unrolled step 0 ") as info:
        unroll.unrolled_game(losses, 2, optimizers={"g": opt, "d": opt})(players, states)
    assert info.value.what == "gradient" and info.value.step == 0


def test_unrolled_game_errors(mlp_params, mlp_forward) -> None:
    players, losses, args = mlp_game(mlp_params, mlp_forward)
    opt = unroll.sgd(0.1)
    states = {"g": opt.init(players["g"]), "d": opt.init(players["d"])}
    with pytest.raises(KeyError, match="losses keys do not match"):
        unroll.unrolled_game({"g": losses["g"]}, 1, optimizers={"g": opt, "d": opt})
    with pytest.raises(TypeError, match=r"optimizers\['d'\] must be an unroll.Optimizer"):
        unroll.unrolled_game(losses, 1, optimizers={"g": opt, "d": torch.optim.SGD})
    with pytest.raises(TypeError, match=r"losses\['g'\] must be callable"):
        unroll.unrolled_game({"g": 1, "d": losses["d"]}, 1, optimizers={"g": opt, "d": opt})
    with pytest.raises(ValueError, match="K"):
        unroll.unrolled_game(losses, -1, optimizers={"g": opt, "d": opt})
    game = unroll.unrolled_game(losses, 1, optimizers={"g": opt, "d": opt})
    with pytest.raises(KeyError, match="no parameters for the moving players"):
        game({"g": players["g"]}, states, *args)
    with pytest.raises(KeyError, match="states keys do not match"):
        game(players, {"g": states["g"]}, *args)
    bad = {"g": lambda p, *a: torch.ones(2, dtype=DTYPE), "d": losses["d"]}
    with pytest.raises(ValueError, match=r"losses\['g'\] must return a scalar"):
        unroll.unrolled_game(bad, 1, optimizers={"g": opt, "d": opt})(players, states, *args)
    calls = []

    def nan_from_the_second_step(p: Dict[str, Dict[str, Tensor]], *a: Tensor) -> Tensor:
        calls.append(1)
        return losses["d"](p, *a) * (float("nan") if len(calls) > 1 else 1.0)
    nan = {"g": losses["g"], "d": nan_from_the_second_step}
    with pytest.raises(unroll.NonFiniteLossError, match=r"losses\['d'\].*step 1"):
        unroll.unrolled_game(nan, 3, optimizers={"g": opt, "d": opt})(players, states, *args)


# ---- LOLA on the iterated prisoner's dilemma ----

def test_ipd_value_is_the_discounted_sum_of_rewards() -> None:
    """V = Σ_t γ^t E[r_t], by 2,000 rounds of the Markov chain, and the game is symmetric between the agents."""
    gen = torch.Generator().manual_seed(0)
    mine, theirs = torch.randn(5, generator=gen, dtype=DTYPE), torch.randn(5, generator=gen, dtype=DTYPE)
    p, q = torch.sigmoid(mine), torch.sigmoid(theirs)[list(ipd.OWN_VIEW)]

    def joint(a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([a * b, a * (1 - b), (1 - a) * b, (1 - a) * (1 - b)], -1)

    transition, dist = joint(p[:4], q[:4]), joint(p[4], q[4])
    reward = torch.tensor(ipd.REWARD, dtype=DTYPE)
    total = torch.zeros((), dtype=DTYPE)
    for t in range(2000):
        total = total + ipd.GAMMA ** t * dist @ reward
        dist = dist @ transition
    torch.testing.assert_close(ipd.value(mine, theirs), total, rtol=1e-10, atol=1e-10)
    their_reward = reward[list(ipd.OWN_VIEW[:4])]  # their reward in my joint-action labels
    torch.testing.assert_close(ipd.occupancy(mine, theirs) @ their_reward, ipd.value(theirs, mine))


def test_lola_look_ahead_gradient_matches_finite_differences() -> None:
    """The K = 1 look-ahead built on surrogate_loss: gradient of V1(θ1, θ2 + η∇_2 V2(θ1, θ2)) in θ1, written
    out by hand here, against central finite differences."""
    gen = torch.Generator().manual_seed(1)
    mine, theirs = torch.randn(5, generator=gen, dtype=DTYPE), torch.randn(5, generator=gen, dtype=DTYPE)

    def composed(m: Tensor) -> Tensor:
        t = theirs.clone().requires_grad_()
        (their_grad,) = torch.autograd.grad(ipd.value(t, m), t, create_graph=True)
        return ipd.value(m, theirs + ipd.ETA * their_grad)

    rule = ipd.look_ahead(1)
    m = mine.clone().requires_grad_()
    torch.testing.assert_close(rule(mine, theirs), torch.autograd.grad(composed(m), m)[0], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(composed, (m,), eps=1e-6, atol=1e-8, rtol=1e-6)
    assert (rule(mine, theirs) - ipd.naive(mine, theirs)).abs().max() > 1e-3


def test_lola_is_the_first_order_part_of_the_exact_look_ahead() -> None:
    """d/dη of the exact look-ahead gradient at η = 0 is LOLA's shaping term plus the look-ahead term; the
    look-ahead term alone is what stop_grad keeps. So (exact − stop_grad)/η → (LOLA − naive)/η as η → 0."""
    gen = torch.Generator().manual_seed(2)
    mine, theirs = torch.randn(5, generator=gen, dtype=DTYPE), torch.randn(5, generator=gen, dtype=DTYPE)
    eta = 1e-6
    shaping_exact = (ipd.look_ahead(1, eta=eta)(mine, theirs) - ipd.look_ahead(1, True, eta=eta)(mine, theirs)) / eta
    shaping_lola = (ipd.lola(mine, theirs, eta=eta) - ipd.naive(mine, theirs)) / eta
    torch.testing.assert_close(shaping_exact, shaping_lola, rtol=1e-4, atol=1e-6)
    assert shaping_lola.abs().max() > 1e-2


def test_ipd_page_commits_every_seed_behind_its_table(tmp_path: Path, one_thread: None) -> None:
    """The per-seed file beside the page holds what each row's mean, sd and paired gap are computed from, and
    the same command writes the same bytes."""
    doc = tmp_path / "ipd.md"
    argv = ["--seeds", "3", "--updates", "2", "--doc", str(doc)]
    default = torch.get_default_dtype()
    try:
        ipd.main(argv)
        first = ipd.per_seed_path(doc).read_bytes()
        ipd.main(argv)
    finally:
        torch.set_default_dtype(default)
    assert ipd.per_seed_path(doc).read_bytes() == first
    numbers = json.loads(first)
    assert numbers["command"] == "python examples/games/ipd.py " + " ".join(argv)
    assert [row["agents"] for row in numbers["pairings"]] == list(ipd.PAIRINGS)
    page = doc.read_text()
    assert ipd.per_seed_path(doc).name in page
    for row in numbers["pairings"]:
        assert all(len(row[key]) == 3 for key in ("reward_1", "reward_2", "cooperation_1", "cooperation_2"))
        assert all(len(p) == 5 and all(0 <= x <= 1 for x in p) for p in row["p_cooperate_1"])
        reward_1, reward_2 = torch.tensor(row["reward_1"]), torch.tensor(row["reward_2"])
        gap = reward_1 - reward_2
        table_row = next(line for line in page.splitlines() if line.startswith(f"| {row['agents']} |"))
        cells = [c.strip() for c in table_row.strip("|").split("|")]
        assert cells[1] == ipd.mean_sd(reward_1) and cells[2] == ipd.mean_sd(reward_2)
        assert cells[3] == f"{gap.mean():+.3f} ± {gap.std() / 3 ** 0.5:.3f}"
        assert cells[4] == ipd.mean_sd(torch.tensor(row["cooperation_1"]))


# ---- the tutorial page runs, and shows the code it runs ----

def python_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.S))


def without_blank_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def test_tutorial_page_shows_the_tutorial_file_and_its_output(one_thread: None, capsys) -> None:
    page = (ROOT / "docs" / "tutorial_games.md").read_text()
    source = (ROOT / "examples" / "games" / "tutorial.py").read_text()
    assert without_blank_lines(python_blocks(page)) == without_blank_lines(source)
    default = torch.get_default_dtype()
    try:
        results = runpy.run_path(str(ROOT / "examples" / "games" / "tutorial.py"))
    finally:
        torch.set_default_dtype(default)
    distances = results["distances"]
    assert distances["gradient descent-ascent"] > 10
    assert distances["look-ahead K=5"] < 1e-10 and distances["one step, extrapolated α=5"] < 1e-10
    printed = capsys.readouterr().out.strip().splitlines()
    shown = page[page.index("Output (`python examples/games/tutorial.py`)"):].split("```")[1].strip().splitlines()
    assert [line.rsplit(":", 1)[0] for line in shown] == [line.rsplit(":", 1)[0] for line in printed]
    for a, b in zip(shown, printed):
        x, y = float(a.rsplit(":", 1)[1]), float(b.rsplit(":", 1)[1])
        assert (x < 1e-10 and y < 1e-10) or x == pytest.approx(y, rel=1e-2)
