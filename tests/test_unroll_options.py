"""Tests of the unrolling options ``transform_grads``, ``truncate`` and ``outer_args``, and of ``unroll.train_step``.

The small float64 GAN of ``test_surrogate.py`` is the inner/outer game: D is unrolled, G's gradient is compared.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor

import unroll
from test_surrogate import (
    Params,
    assert_close,
    assert_matches_finite_differences,
    assert_trees_equal,
    grads_of,
    make_game,
    snapshot,
    stack_trees,
)

K = 4


def adam() -> unroll.Optimizer:
    return unroll.adam(0.05, betas=(0.5, 0.999))


def warm_state(game, opt: unroll.Optimizer) -> Dict:
    """A non-fresh optimizer state (two real D steps), so the unroll's second term is not ~0."""
    params, state = unroll.unrolled_params(game.d_loss, 2, True, optimizer=opt)(
        game.d_params, opt.init(game.d_params), *game.args)
    return state


def g_grad(game, surrogate, state) -> Params:
    return grads_of(surrogate(game.d_params, state, *game.args), game.g_params)


# ---------------------------------------------------------------------------------------------------------------
# transform_grads
# ---------------------------------------------------------------------------------------------------------------


def test_identity_transform_gives_todays_results_exactly() -> None:
    game, opt = make_game(seed=1), adam()
    state = warm_state(game, opt)
    plain = unroll.surrogate_loss(game.d_loss, K, optimizer=opt)
    identity = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, transform_grads=lambda grads, k: grads)
    assert_trees_equal(plain(game.d_params, state, *game.args), identity(game.d_params, state, *game.args))
    assert_trees_equal(g_grad(game, plain, state), g_grad(game, identity, state))


@pytest.mark.parametrize("stop_grad", [False, True])
def test_scaling_grads_by_two_equals_doubling_the_inner_loss(stop_grad: bool) -> None:
    game, opt = make_game(seed=2), adam()
    state = warm_state(game, opt)
    outer = lambda d, *args: -game.d_loss(d, *args)  # noqa: E731  (the same outer loss for both)
    doubled = unroll.surrogate_loss(lambda d, *a: 2 * game.d_loss(d, *a), K, stop_grad, optimizer=opt,
                                    outer_fn=outer)
    scaled = unroll.surrogate_loss(game.d_loss, K, stop_grad, optimizer=opt, outer_fn=outer,
                                   transform_grads=lambda grads, k: {n: 2 * g for n, g in grads.items()})
    assert_close(scaled(game.d_params, state, *game.args), doubled(game.d_params, state, *game.args))
    assert_close(g_grad(game, scaled, state), g_grad(game, doubled, state))


def test_transform_sees_named_grads_at_every_step_and_is_differentiated() -> None:
    game, opt = make_game(seed=3), adam()
    seen: List[Tuple[int, Tuple[str, ...]]] = []

    def clip(grads: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
        seen.append((k, tuple(grads)))
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        return {n: g * torch.clamp(0.1 / norm, max=1.0) for n, g in grads.items()}

    state = warm_state(game, opt)
    surrogate = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, transform_grads=clip)
    grads = g_grad(game, surrogate, state)
    assert seen == [(k, tuple(game.d_params)) for k in range(K)]
    # The clipping is inside the differentiated computation: central finite differences agree.
    assert_matches_finite_differences(
        grads, lambda g: surrogate(game.d_params, state, g, game.real, game.z), game.g_params)


@pytest.mark.parametrize("bad, error, match", [
    (lambda grads, k: {n: g for n, g in list(grads.items())[1:]}, KeyError, "missing"),
    (lambda grads, k: {**grads, "extra": next(iter(grads.values()))}, KeyError, "unexpected"),
    (lambda grads, k: {n: g.reshape(-1)[:1] for n, g in grads.items()}, ValueError, "shape"),
    (lambda grads, k: [g for g in grads.values()], TypeError, "mapping"),
])
def test_transform_returning_other_keys_or_shapes_is_refused(bad, error, match: str) -> None:
    game, opt = make_game(seed=4), adam()
    surrogate = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, transform_grads=bad)
    with pytest.raises(error, match=match):
        surrogate(game.d_params, opt.init(game.d_params), *game.args)


def test_transform_must_be_callable() -> None:
    with pytest.raises(TypeError, match="transform_grads must be callable"):
        unroll.surrogate_loss(lambda p: p["w"].sum(), K, optimizer=adam(), transform_grads=3)


# ---------------------------------------------------------------------------------------------------------------
# truncate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncate_k_is_the_full_gradient_and_zero_is_stop_grad(checkpoint: bool) -> None:
    game, opt = make_game(seed=5), adam()
    state = warm_state(game, opt)
    full = unroll.surrogate_loss(game.d_loss, K, optimizer=opt)
    stopped = unroll.surrogate_loss(game.d_loss, K, True, optimizer=opt)
    assert_close(g_grad(game, unroll.surrogate_loss(game.d_loss, K, optimizer=opt, truncate=K,
                                                    checkpoint=checkpoint), state), g_grad(game, full, state))
    assert_close(g_grad(game, unroll.surrogate_loss(game.d_loss, K, optimizer=opt, truncate=0,
                                                    checkpoint=checkpoint), state), g_grad(game, stopped, state))


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncate_treats_theta_k_minus_t_as_a_constant(T: int, checkpoint: bool) -> None:
    game, opt = make_game(seed=6), adam()
    state = warm_state(game, opt)
    truncated = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, truncate=T, checkpoint=checkpoint)
    # Reference: run K - T steps, cut the graph, then unroll T differentiable steps from there.
    head_params, head_state = unroll.unrolled_params(game.d_loss, K - T, optimizer=opt)(
        game.d_params, state, *game.args)
    head_params, head_state = {n: p.detach() for n, p in head_params.items()}, {
        "step": head_state["step"].detach(), **{b: {n: t.detach() for n, t in head_state[b].items()}
                                                for b in opt.buffers}}
    tail = unroll.surrogate_loss(game.d_loss, T, optimizer=opt)
    value = truncated(game.d_params, state, *game.args)
    expected = tail(head_params, head_state, *game.args)
    assert_close(value, expected)
    assert_close(grads_of(value, game.g_params), grads_of(expected, game.g_params))
    # The truncated gradient differs from the full one (the test could fail) and nothing reaches theta^0.
    full = g_grad(game, unroll.surrogate_loss(game.d_loss, K, optimizer=opt), state)
    assert not torch.allclose(grads_of(value, game.g_params)["0.weight"], full["0.weight"])
    assert all(g is None for g in torch.autograd.grad(value, list(game.d_params.values()), allow_unused=True))


def test_truncated_unrolled_params_keep_forward_values() -> None:
    game, opt = make_game(seed=7), adam()
    state = warm_state(game, opt)
    full = unroll.unrolled_params(game.d_loss, K, optimizer=opt)(game.d_params, state, *game.args)
    cut = unroll.unrolled_params(game.d_loss, K, optimizer=opt, truncate=1)(game.d_params, state, *game.args)
    assert_trees_equal(snapshot(cut), snapshot(full))


@pytest.mark.parametrize("truncate, error", [(-1, ValueError), (K + 1, ValueError), (1.5, TypeError),
                                             (True, TypeError)])
def test_truncate_out_of_range_is_refused_before_any_work(truncate, error) -> None:
    def never_called(params: Params) -> Tensor:
        raise AssertionError("no work may happen before the check")

    for make in (unroll.surrogate_loss, unroll.unrolled_params):
        with pytest.raises(error, match="truncate"):
            make(never_called, K, optimizer=adam(), truncate=truncate)


def test_truncate_under_func_grad_and_vmap_matches_autograd() -> None:
    games = [make_game(seed=s) for s in (8, 9)]
    opt = adam()
    surrogate = unroll.surrogate_loss(games[0].d_loss, K, optimizer=opt, truncate=2)

    def loss(g_params: Params, d_params: Params, state: Dict, real: Tensor, z: Tensor) -> Tensor:
        return surrogate(d_params, state, g_params, real, z)

    states = [warm_state(game, opt) for game in games]
    expected = [g_grad(game, surrogate, state) for game, state in zip(games, states)]
    stacked = [stack_trees([snapshot(getattr(g, name)) for g in games]) for name in ("g_params", "d_params")]
    batched = torch.func.vmap(torch.func.grad(loss))(
        *stacked, stack_trees([snapshot(s) for s in states]),
        torch.stack([g.real for g in games]), torch.stack([g.z for g in games]))
    for i, want in enumerate(expected):
        assert_close({n: batched[n][i] for n in want}, want, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------------------------
# outer_args: the outer loss gets its own arguments (meta-learning: train on args, validate on outer_args)
# ---------------------------------------------------------------------------------------------------------------


def test_outer_args_match_the_closure_recipe() -> None:
    gen = torch.Generator().manual_seed(0)
    x_train, y_train = torch.randn(16, 3, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen,
                                                                                           dtype=torch.float64)
    x_val, y_val = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen,
                                                                                      dtype=torch.float64)
    weights = {"w": torch.zeros(3, dtype=torch.float64)}
    log_lr = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    def mse(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return ((x @ params["w"] - y) ** 2).mean()

    opt = unroll.sgd(log_lr.exp())
    with_outer_args = unroll.surrogate_loss(mse, 5, optimizer=opt, outer_fn=mse)(
        weights, opt.init(weights), x_train, y_train, outer_args=(x_val, y_val))
    closure = unroll.surrogate_loss(mse, 5, optimizer=opt, outer_fn=lambda p, *_: mse(p, x_val, y_val))(
        weights, opt.init(weights), x_train, y_train)
    assert_trees_equal(with_outer_args, closure)
    (meta_grad,) = torch.autograd.grad(with_outer_args, log_lr)
    assert meta_grad != 0 and torch.isfinite(meta_grad)


def test_outer_args_errors() -> None:
    opt = adam()
    params = {"w": torch.zeros(2)}
    loss = lambda p, x: (p["w"] * x).sum() ** 2  # noqa: E731
    with pytest.raises(TypeError, match="outer_args must be a tuple"):
        unroll.surrogate_loss(loss, 1, optimizer=opt, outer_fn=loss)(params, opt.init(params), torch.ones(2),
                                                                     outer_args=torch.ones(2))
    with pytest.raises(ValueError, match="outer_args needs an outer_fn"):
        unroll.surrogate_loss(loss, 1, optimizer=opt)(params, opt.init(params), torch.ones(2),
                                                      outer_args=(torch.ones(2),))


# ---------------------------------------------------------------------------------------------------------------
# train_step: one committed step
# ---------------------------------------------------------------------------------------------------------------


def test_train_step_is_one_optimizer_step_on_the_gradient() -> None:
    game, opt = make_game(seed=10), adam()
    state = warm_state(game, opt)
    before = snapshot((game.d_params, state))
    new_params, new_state, loss = unroll.train_step(game.d_loss, optimizer=opt)(game.d_params, state, *game.args)
    value = game.d_loss(game.d_params, *game.args)
    grads = grads_of(value, game.d_params)
    expected_params, expected_state = opt.step(snapshot(game.d_params), grads, state)
    assert_close(new_params, expected_params)
    assert_close(new_state, expected_state)
    assert_close(loss, value.detach())
    assert not any(t.requires_grad for t in new_params.values()) and not loss.requires_grad
    assert_trees_equal(snapshot((game.d_params, state)), before)


def test_train_step_with_transform_and_under_vmap() -> None:
    opt = unroll.sgd(0.1)
    loss = lambda p, x: ((p["w"] - x) ** 2).sum()  # noqa: E731
    halve = lambda grads, k: {n: g / 2 for n, g in grads.items()}  # noqa: E731
    step = unroll.train_step(loss, optimizer=opt, transform_grads=halve)
    w, x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    params = {"w": w}
    states = {"step": torch.zeros(2)}
    new_params, new_state, losses = torch.func.vmap(step)(params, states, x)
    # Gradient 2 (w - x), halved, lr 0.1: w - 0.1 (w - x).
    assert_close(new_params["w"], w - 0.1 * (w - x), rtol=1e-6, atol=1e-7)
    assert_close(losses, ((w - x) ** 2).sum(-1), rtol=1e-6, atol=1e-7)
    assert torch.equal(new_state["step"], torch.ones(2))


def test_public_classes_read_as_unroll_names() -> None:
    assert unroll.NonFiniteLossError.__module__ == "unroll"
    assert unroll.Optimizer.__module__ == "unroll"
