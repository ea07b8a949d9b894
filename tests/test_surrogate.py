"""Tests of ``unroll.surrogate_loss`` and ``unroll.unrolled_params`` on small GAN-like players.

The generator G (z -> hidden -> 2) and the discriminator D (x -> hidden -> logit) are ``nn.Sequential`` MLPs
called through ``torch.func.functional_call`` with parameter dicts. The inner player is D, minimising its BCE loss
on (real, G(z)); the generator's parameters reach it through ``args``. Everything is float64 so that gradients
can be compared tightly with hand-written references and central finite differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import unroll

DTYPE = torch.float64
Params = Dict[str, Tensor]
LossFn = Callable[..., Tensor]

# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def mlp(sizes: Sequence[int], gen: torch.Generator, act: Type[nn.Module] = nn.Tanh,
        batchnorm: bool = False) -> nn.Sequential:
    """Linear layers of widths ``sizes`` with ``act`` (and optionally BatchNorm) between them, seeded by ``gen``."""
    layers: List[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out, dtype=DTYPE))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(fan_out, dtype=DTYPE))
            layers.append(act())
    net = nn.Sequential(*layers)
    # Re-initialise from ``gen`` so that no test depends on (or changes) the global RNG.
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) / fan_in ** 0.5)
    return net


@dataclass
class Game:
    """A tiny GAN: modules define the architecture; ``g_params``/``d_params`` are separate leaf copies."""

    G: nn.Module
    D: nn.Module
    g_params: Params
    d_params: Params
    real: Tensor
    z: Tensor

    def fake(self, g_params: Params, z: Tensor) -> Tensor:
        return functional_call(self.G, g_params, (z,))

    def logits(self, d_params: Params, x: Tensor) -> Tensor:
        return functional_call(self.D, d_params, (x,)).squeeze(-1)

    def d_loss(self, d_params: Params, g_params: Params, real: Tensor, z: Tensor) -> Tensor:
        """The inner (discriminator) loss: BCE of D on real (label 1) and G(z) (label 0)."""
        fake = self.fake(g_params, z)
        # One D call on the joint batch, so that BatchNorm updates its running statistics once per step.
        logits = self.logits(d_params, torch.cat([real, fake]))
        real_logits, fake_logits = logits[: len(real)], logits[len(real):]
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def ns_loss(self, d_params: Params, g_params: Params, real: Tensor, z: Tensor) -> Tensor:
        """The non-saturating generator loss -log D(G(z)) (Goodfellow et al., 2014), a custom ``outer_fn``."""
        return F.softplus(-self.logits(d_params, self.fake(g_params, z))).mean()

    @property
    def args(self) -> Tuple[Params, Tensor, Tensor]:
        return self.g_params, self.real, self.z


def make_game(seed: int, *, z_dim: int = 2, g_hidden: Sequence[int] = (3,), d_hidden: Sequence[int] = (3,),
              batch: int = 4, act: Type[nn.Module] = nn.Tanh, d_act: Optional[Type[nn.Module]] = None,
              batchnorm: bool = False) -> Game:
    gen = torch.Generator().manual_seed(seed)
    G = mlp([z_dim, *g_hidden, 2], gen, act)
    D = mlp([2, *d_hidden, 1], gen, d_act or act, batchnorm=batchnorm)
    real = torch.randn(batch, 2, generator=gen, dtype=DTYPE) + 1.0
    z = torch.randn(batch, z_dim, generator=gen, dtype=DTYPE)
    return Game(G, D, leaf_copy(dict(G.named_parameters())), leaf_copy(dict(D.named_parameters())), real, z)


def leaf_copy(params: Mapping[str, Tensor], requires_grad: bool = True) -> Params:
    return {name: p.detach().clone().requires_grad_(requires_grad) for name, p in params.items()}


def grads_of(value: Tensor, params: Params, **kwargs: Any) -> Params:
    kwargs.setdefault("retain_graph", True)  # tests take several gradients of one value
    return dict(zip(params, torch.autograd.grad(value, list(params.values()), **kwargs)))


def flat(tensors: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflat(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = vector[offset: offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def assert_close(actual: Any, expected: Any, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """allclose (float64-tight by default) on tensors or nested dicts/tuples of them, keys and dtypes included."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Same structure and bit-identical tensors (``torch.equal``); other leaves compared with ``==``."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(e, Tensor):
            assert isinstance(a, Tensor) and a.dtype == e.dtype and torch.equal(a, e)
        else:
            assert a == e


def snapshot(tree: Any) -> Any:
    return pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), tree)


def directional_derivatives(f: Callable[[Params], Tensor], params: Params, n: int = 4, h: float = 1e-6,
                            seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Central differences of ``f`` at ``params`` along ``n`` random unit directions: ``(directions, slopes)``.

    Comparing ``directions @ grad`` with the slopes checks the whole gradient (a wrong entry shows up in every
    random direction) for 2n evaluations instead of two per parameter. ``f`` runs under ``no_grad``.
    """
    base = flat(params).detach()
    directions = torch.randn(n, base.numel(), generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    directions = directions / directions.norm(dim=1, keepdim=True)
    with torch.no_grad():
        slopes = torch.stack([(f(unflat(base + h * d, params)) - f(unflat(base - h * d, params))) / (2 * h)
                              for d in directions])
    return directions, slopes


def hand_unroll(loss_at: Callable[[int, Params], Tensor], params: Params, K: int,
                update: Callable[[Params, Params, Any], Tuple[Params, Any]], state: Any) -> Tuple[Params, Any]:
    """Reference unroll written with ``torch.autograd.grad(create_graph=True)``, independent of unroll's loop."""
    for k in range(K):
        grads = grads_of(loss_at(k, params), params, create_graph=True)
        params, state = update(params, grads, state)
    return params, state


def minimax_value(game: Game, d_params: Params, g_params: Params) -> Tensor:
    """V(D, G) of the GAN minimax game written out by hand (the generator minimises it; it equals -d_loss)."""
    real_logits, fake_logits = game.logits(d_params, game.real), game.logits(d_params, game.fake(g_params, game.z))
    # log sigmoid(l) = -softplus(-l),  log(1 - sigmoid(l)) = -softplus(l)
    return -F.softplus(-real_logits).mean() - F.softplus(fake_logits).mean()


# The optimizers (and options) whose unrolls the finite-difference test covers; learning rates are large enough
# for the unrolled steps to matter.
OPTIMIZERS: Dict[str, unroll.Optimizer] = {
    "sgd-momentum": unroll.sgd(0.5, momentum=0.9),
    "adam": unroll.adam(0.05, betas=(0.5, 0.999)),
    "adam-amsgrad": unroll.adam(0.05, betas=(0.5, 0.9), amsgrad=True),
    "rmsprop": unroll.rmsprop(0.02, alpha=0.9),
    "rmsprop-centered-momentum": unroll.rmsprop(0.02, alpha=0.9, momentum=0.5, centered=True),
}


def outer_of(game: Game, outer: str) -> Optional[LossFn]:
    return {"default": None, "non-saturating": game.ns_loss}[outer]


def outer_value(game: Game, outer: str) -> LossFn:
    """The outer loss as a plain function (the default ``outer_fn`` is ``-inner_fn``)."""
    fn = outer_of(game, outer)
    return fn if fn is not None else (lambda p, *args: -game.d_loss(p, *args))


# --------------------------------------------------------------------------------------------------------------
# 1. K = 0 is the plain GAN gradient
# --------------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), z_dim=st.integers(1, 3),
       g_hidden=st.lists(st.integers(1, 5), min_size=1, max_size=2),
       d_hidden=st.lists(st.integers(1, 5), min_size=1, max_size=2),
       batch=st.integers(1, 6), outer=st.sampled_from(["default", "non-saturating"]),
       optimizer=st.sampled_from(sorted(OPTIMIZERS)))
def test_k0_gradient_is_plain_gan_gradient(seed: int, z_dim: int, g_hidden: List[int], d_hidden: List[int],
                                           batch: int, outer: str, optimizer: str) -> None:
    game = make_game(seed, z_dim=z_dim, g_hidden=g_hidden, d_hidden=d_hidden, batch=batch,
                     act=nn.LeakyReLU)
    opt = OPTIMIZERS[optimizer]
    surrogate = unroll.surrogate_loss(game.d_loss, 0, optimizer=opt, outer_fn=outer_of(game, outer))
    value = surrogate(game.d_params, opt.init(game.d_params), *game.args)

    # The plain GAN generator loss, written by hand on the modules themselves (no functional_call).
    for p, q in zip(game.G.parameters(), game.g_params.values()):
        assert torch.equal(p, q)
    real_logits, fake_logits = game.D(game.real).squeeze(-1), game.D(game.G(game.z)).squeeze(-1)
    if outer == "default":
        plain = -F.softplus(-real_logits).mean() - F.softplus(fake_logits).mean()
    else:
        plain = F.softplus(-fake_logits).mean()
    assert_close(value, plain)
    expected = torch.autograd.grad(plain, list(game.G.parameters()))
    assert_close(grads_of(value, game.g_params), dict(zip(game.g_params, expected)))


# --------------------------------------------------------------------------------------------------------------
# 2. Finite differences of d(value)/d(theta_G)
# --------------------------------------------------------------------------------------------------------------


def assert_matches_finite_differences(grads: Params, f: Callable[[Params], Tensor], params: Params) -> None:
    directions, slopes = directional_derivatives(f, params)
    analytic = directions @ flat(grads)
    assert analytic.abs().max() > 1e-3  # a vanishing gradient would make the comparison vacuous
    assert_close(analytic, slopes, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("stop_grad", [False, True])
def test_generator_gradient_matches_finite_differences(K: int, optimizer: str, stop_grad: bool) -> None:
    game = make_game(seed=10 * K + len(optimizer))
    opt = OPTIMIZERS[optimizer]
    state = opt.init(game.d_params)
    surrogate = unroll.surrogate_loss(game.d_loss, K, stop_grad, optimizer=opt)
    grads = grads_of(surrogate(game.d_params, state, *game.args), game.g_params)
    if stop_grad:
        # theta_D^K is a constant: differentiate with the unroll frozen at the current theta_G, i.e. the inner
        # steps always see theta_G^0 while the outer loss sees the perturbed theta_G.
        g0 = leaf_copy(game.g_params, requires_grad=False)
        surrogate = unroll.surrogate_loss(game.d_loss, K, optimizer=opt,
                                          step_args=lambda k, g, real, z: (g0, real, z))
    assert_matches_finite_differences(
        grads, lambda g: surrogate(game.d_params, state, g, game.real, game.z), game.g_params)


def test_nonsaturating_outer_gradient_matches_finite_differences() -> None:
    game = make_game(seed=5)
    opt = OPTIMIZERS["adam"]
    state = opt.init(game.d_params)
    surrogate = unroll.surrogate_loss(game.d_loss, 3, optimizer=opt, outer_fn=game.ns_loss)
    grads = grads_of(surrogate(game.d_params, state, *game.args), game.g_params)
    assert_matches_finite_differences(
        grads, lambda g: surrogate(game.d_params, state, g, game.real, game.z), game.g_params)


# --------------------------------------------------------------------------------------------------------------
# 3. The two terms of Eq. 12
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam", "rmsprop-centered-momentum"])
@pytest.mark.parametrize("outer", ["default", "non-saturating"])
def test_stop_grad_is_first_term_and_full_gradient_adds_second(K: int, optimizer: str, outer: str) -> None:
    game = make_game(seed=21)
    opt = OPTIMIZERS[optimizer]
    state = opt.init(game.d_params)
    fn = outer_value(game, outer)
    kwargs = dict(optimizer=opt, outer_fn=outer_of(game, outer))
    full = grads_of(unroll.surrogate_loss(game.d_loss, K, **kwargs)(game.d_params, state, *game.args),
                    game.g_params)
    stopped = grads_of(unroll.surrogate_loss(game.d_loss, K, True, **kwargs)(game.d_params, state, *game.args),
                       game.g_params)

    theta_k, _ = unroll.unrolled_params(game.d_loss, K, optimizer=opt)(game.d_params, state, *game.args)
    # First term of Eq. 12: df/dtheta_G with theta_D^K held constant.
    first = grads_of(fn({n: t.detach() for n, t in theta_k.items()}, *game.args), game.g_params)
    assert_close(stopped, first)

    # Second term: (df/dtheta_D^K) (dtheta_D^K/dtheta_G), as a vector-Jacobian product through the unroll.
    theta_k_leaf = leaf_copy(theta_k)
    df_dtheta_k = grads_of(fn(theta_k_leaf, leaf_copy(game.g_params, False), game.real, game.z), theta_k_leaf)
    second = dict(zip(game.g_params, torch.autograd.grad(list(theta_k.values()), list(game.g_params.values()),
                                                         grad_outputs=list(df_dtheta_k.values()))))
    assert_close(full, {n: first[n] + second[n] for n in first})
    # The term stop_grad drops is not negligible: full and stopped gradients really differ. (Except after one
    # Adam/RMSProp step from a fresh state, which moves each entry by about lr * sign(grad): its response to
    # theta_G is O(eps) and the second term vanishes.)
    if K > 1 or optimizer.startswith("sgd"):
        assert (flat(full) - flat(stopped)).norm() > 1e-2 * flat(full).norm()


# --------------------------------------------------------------------------------------------------------------
# 4. Hand-written SGD unroll
# --------------------------------------------------------------------------------------------------------------


def test_matches_hand_written_sgd_unroll() -> None:
    game = make_game(seed=7)
    lr, K = 0.3, 2
    opt = unroll.sgd(lr)
    value = unroll.surrogate_loss(game.d_loss, K, optimizer=opt)(game.d_params, opt.init(game.d_params), *game.args)

    def sgd_step(params: Params, grads: Params, state: None) -> Tuple[Params, None]:
        return {n: params[n] - lr * grads[n] for n in params}, state

    theta_2, _ = hand_unroll(lambda k, p: game.d_loss(p, *game.args), game.d_params, K, sgd_step, None)
    expected = minimax_value(game, theta_2, game.g_params)
    assert_close(value, expected)
    assert_close(grads_of(value, game.g_params), grads_of(expected, game.g_params))
    # Gradients with respect to the discriminator's starting point flow through the unroll too.
    assert_close(grads_of(value, game.d_params), grads_of(expected, game.d_params))


# --------------------------------------------------------------------------------------------------------------
# 5. Exactly-zero gradient entries (dead ReLU units)
# --------------------------------------------------------------------------------------------------------------


def naive_adam(lr: float, beta1: float, beta2: float, eps: float
               ) -> Callable[[Params, Params, Dict[str, Any]], Tuple[Params, Dict[str, Any]]]:
    """Adam written the obvious way with ``torch.sqrt`` (as differentiable optimizers usually are)."""

    def update(params: Params, grads: Params, state: Dict[str, Any]) -> Tuple[Params, Dict[str, Any]]:
        t = state["t"] + 1
        m = {n: beta1 * state["m"][n] + (1 - beta1) * grads[n] for n in params}
        v = {n: beta2 * state["v"][n] + (1 - beta2) * grads[n] ** 2 for n in params}
        new = {n: params[n] - lr / (1 - beta1 ** t) * m[n] / (torch.sqrt(v[n]) / math.sqrt(1 - beta2 ** t) + eps)
               for n in params}
        return new, {"t": t, "m": m, "v": v}

    return update


def dead_unit_game() -> Game:
    game = make_game(seed=3, d_hidden=(4,), batch=6, d_act=nn.ReLU)
    with torch.no_grad():
        game.d_params["0.bias"][0] = -1e3  # hidden unit 0 never activates on any input
    return game


@pytest.mark.parametrize("optimizer", [unroll.adam(0.05, betas=(0.5, 0.999)), unroll.adam(0.05, amsgrad=True),
                                       unroll.rmsprop(0.02), unroll.rmsprop(0.02, centered=True, momentum=0.5)],
                         ids=["adam", "adam-amsgrad", "rmsprop", "rmsprop-centered-momentum"])
def test_dead_relu_units_give_finite_meta_gradients(optimizer: unroll.Optimizer) -> None:
    game = dead_unit_game()
    inner_grads = grads_of(game.d_loss(game.d_params, *game.args), game.d_params)
    dead = {"0.weight": inner_grads["0.weight"][0], "0.bias": inner_grads["0.bias"][0],
            "2.weight": inner_grads["2.weight"][:, 0]}
    for name, entries in dead.items():
        assert torch.all(entries == 0), name
    assert flat(inner_grads).ne(0).any()

    value = unroll.surrogate_loss(game.d_loss, 3, optimizer=optimizer)(
        game.d_params, optimizer.init(game.d_params), *game.args)
    meta_grads = grads_of(value, {**game.g_params, **game.d_params})
    assert torch.isfinite(flat(meta_grads)).all()
    assert flat(grads_of(value, game.g_params)).ne(0).any()


def test_dead_relu_naive_sqrt_gives_nan_but_unroll_adam_does_not() -> None:
    game = dead_unit_game()
    lr, beta1, beta2, eps, K = 0.05, 0.5, 0.999, 1e-8, 2
    opt = unroll.adam(lr, betas=(beta1, beta2), eps=eps)
    value = unroll.surrogate_loss(game.d_loss, K, optimizer=opt)(game.d_params, opt.init(game.d_params),
                                                                  *game.args)
    zeros = {n: torch.zeros_like(p) for n, p in game.d_params.items()}
    theta_k, _ = hand_unroll(lambda k, p: game.d_loss(p, *game.args), game.d_params, K,
                             naive_adam(lr, beta1, beta2, eps), {"t": 0, "m": zeros, "v": zeros})
    naive_value = -game.d_loss(theta_k, *game.args)
    # Same forward value; only the derivative of sqrt at 0 differs.
    assert_close(value, naive_value)
    assert torch.isnan(flat(grads_of(naive_value, game.g_params))).any()
    assert torch.isfinite(flat(grads_of(value, game.g_params))).all()


# --------------------------------------------------------------------------------------------------------------
# 6. Nothing is mutated; BatchNorm running statistics are updated in copies
# --------------------------------------------------------------------------------------------------------------


def test_inputs_modules_buffers_and_torch_state_are_untouched() -> None:
    K = 2
    game = make_game(seed=11, d_hidden=(4,), batch=5, batchnorm=True)
    D = game.D
    D.train()
    torch_opt = torch.optim.Adam(D.parameters(), lr=0.01, betas=(0.5, 0.999))
    for _ in range(2):  # give the torch optimizer (and BatchNorm) a non-trivial state
        torch_opt.zero_grad()
        game.d_loss(dict(D.named_parameters()), *game.args).backward()
        torch_opt.step()
    opt, state = unroll.from_torch(torch_opt, D)
    params, buffers = dict(D.named_parameters()), dict(D.named_buffers())
    assert "1.running_mean" in buffers and "1.num_batches_tracked" in buffers
    before = snapshot({"module": D.state_dict(), "state": state, "torch": torch_opt.state_dict(),
                       "args": game.args, "buffers": buffers, "params": params})

    seen: List[Params] = []

    def outer_fn(p: Params, *args: Any) -> Tensor:
        seen.append(snapshot({n: p[n] for n in buffers}))
        return game.ns_loss(p, *args)

    value = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, outer_fn=outer_fn)(
        params, state, *game.args, buffers=buffers)
    value.backward()
    assert flat({n: p.grad for n, p in game.g_params.items()}).ne(0).any()

    after = {"module": D.state_dict(), "state": state, "torch": torch_opt.state_dict(), "args": game.args,
             "buffers": buffers, "params": params}
    assert_trees_equal(after, before)
    # The unroll ran BatchNorm in train mode on copies: one statistics update per inner step.
    assert len(seen) == 1
    assert int(seen[0]["1.num_batches_tracked"]) == int(before["buffers"]["1.num_batches_tracked"]) + K
    assert not torch.equal(seen[0]["1.running_mean"], before["buffers"]["1.running_mean"])
    assert not torch.equal(seen[0]["1.running_var"], before["buffers"]["1.running_var"])


def test_unrolled_params_leaves_buffers_untouched() -> None:
    game = make_game(seed=12, d_hidden=(4,), batch=5, batchnorm=True)
    buffers = dict(game.D.named_buffers())
    before = snapshot((buffers, game.d_params))
    opt = unroll.adam(0.01)
    theta_k, state_k = unroll.unrolled_params(game.d_loss, 2, optimizer=opt)(
        game.d_params, opt.init(game.d_params), *game.args, buffers=buffers)
    assert set(theta_k) == set(game.d_params)  # buffers are never optimised nor returned as params
    assert_trees_equal((buffers, game.d_params), before)
    assert float(state_k["step"]) == 2


# --------------------------------------------------------------------------------------------------------------
# 7. torch.func
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_func_grad_matches_autograd(batchnorm: bool) -> None:
    game = make_game(seed=13, batchnorm=batchnorm)  # BatchNorm in train mode: running statistics updated in copies
    buffers = dict(game.D.named_buffers())
    opt = unroll.adam(0.05, betas=(0.5, 0.999))
    state = opt.init(game.d_params)
    surrogate = unroll.surrogate_loss(game.d_loss, 2, optimizer=opt)
    d_params = leaf_copy(game.d_params, False)

    def f(g: Params) -> Tensor:
        return surrogate(d_params, state, g, game.real, game.z, buffers=buffers)

    expected = grads_of(f(game.g_params), game.g_params)
    assert_close(torch.func.grad(f)(leaf_copy(game.g_params, False)), expected)


def stack_trees(trees: Sequence[Any]) -> Any:
    leaves = [pytree.tree_flatten(t)[0] for t in trees]
    spec = pytree.tree_flatten(trees[0])[1]
    return pytree.tree_unflatten([torch.stack(xs) for xs in zip(*leaves)], spec)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_vmap_over_seeds_matches_per_seed_results(batchnorm: bool) -> None:
    # BatchNorm in eval mode only: in train mode it updates its running statistics in place, which vmap cannot
    # do on buffers shared by all seeds. Eval mode reads them (shared, unbatched) and is fine.
    games = [make_game(seed=s, batchnorm=batchnorm) for s in (30, 31, 32)]
    for game in games:
        game.D.eval()
    buffers = dict(games[0].D.named_buffers())
    opt = unroll.rmsprop(0.02, alpha=0.9, momentum=0.5, centered=True)
    surrogate = unroll.surrogate_loss(games[0].d_loss, 2, optimizer=opt, outer_fn=games[0].ns_loss)
    states = [opt.init(g.d_params) for g in games]

    def value_and_grad(g: Params, d: Params, state: Dict[str, Any], real: Tensor, z: Tensor) -> Tuple[Params, Tensor]:
        return torch.func.grad_and_value(lambda g_: surrogate(d, state, g_, real, z, buffers=buffers))(g)

    batched = [stack_trees([snapshot(getattr(g, field)) for g in games])
               for field in ("g_params", "d_params", "real", "z")]
    grads, values = torch.func.vmap(value_and_grad)(batched[0], batched[1], stack_trees(states),
                                                    batched[2], batched[3])
    for i, (game, state) in enumerate(zip(games, states)):
        value = surrogate(game.d_params, state, *game.args, buffers=buffers)
        assert_close(values[i], value)
        assert_close({n: g[i] for n, g in grads.items()}, grads_of(value, game.g_params))


# --------------------------------------------------------------------------------------------------------------
# 8. Re-sampled minibatches (step_args)
# --------------------------------------------------------------------------------------------------------------


def resampled_batches(game: Game, K: int, seed: int = 99) -> List[Tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(game.real.shape, generator=gen, dtype=DTYPE) + 1.0,
             torch.randn(game.z.shape, generator=gen, dtype=DTYPE)) for _ in range(K)]


@pytest.mark.parametrize("stop_grad", [False, True])
def test_step_args_resamples_each_step(stop_grad: bool) -> None:
    K = 3
    game = make_game(seed=17)
    opt = OPTIMIZERS["adam"]
    state = opt.init(game.d_params)
    batches = resampled_batches(game, K)

    def step_args(k: int, g: Params, real: Tensor, z: Tensor) -> Tuple[Params, Tensor, Tensor]:
        return (g, *batches[k])

    resampled = unroll.surrogate_loss(game.d_loss, K, stop_grad, optimizer=opt, step_args=step_args)
    fixed = unroll.surrogate_loss(game.d_loss, K, stop_grad, optimizer=opt)
    value, fixed_value = resampled(game.d_params, state, *game.args), fixed(game.d_params, state, *game.args)
    grads = grads_of(value, game.g_params)
    assert not torch.allclose(value, fixed_value)

    # Reference: batch k at step k; the outer loss always sees the caller's batch.
    theta_k, _ = hand_unroll(lambda k, p: game.d_loss(p, game.g_params, *batches[k]), game.d_params, K,
                             opt.step, state)
    if stop_grad:
        theta_k = {n: t.detach() for n, t in theta_k.items()}
    expected = -game.d_loss(theta_k, *game.args)
    assert_close(value, expected)
    assert_close(grads, grads_of(expected, game.g_params))


def test_step_args_returning_same_args_reproduces_default() -> None:
    game = make_game(seed=18)
    opt = OPTIMIZERS["rmsprop-centered-momentum"]
    state = opt.init(game.d_params)
    default = unroll.surrogate_loss(game.d_loss, 3, optimizer=opt)(game.d_params, state, *game.args)
    same = unroll.surrogate_loss(game.d_loss, 3, optimizer=opt, step_args=lambda k, *args: args)(
        game.d_params, state, *game.args)
    assert torch.equal(same, default)
    assert_trees_equal(grads_of(same, game.g_params), grads_of(default, game.g_params))


# --------------------------------------------------------------------------------------------------------------
# 9. Averaging the outer loss over the unrolled steps
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [0, 1, 3])
@pytest.mark.parametrize("outer", ["default", "non-saturating"])
def test_average_over_steps(K: int, outer: str) -> None:
    game = make_game(seed=19)
    opt = OPTIMIZERS["sgd-momentum"]
    state = opt.init(game.d_params)
    fn = outer_value(game, outer)
    value = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, outer_fn=outer_of(game, outer),
                                  average_over_steps=True)(game.d_params, state, *game.args)
    if K == 0:
        expected = fn(game.d_params, *game.args)
    else:
        thetas = [unroll.unrolled_params(game.d_loss, k, optimizer=opt)(game.d_params, state, *game.args)[0]
                  for k in range(1, K + 1)]
        expected = torch.stack([fn(theta, *game.args) for theta in thetas]).mean()
    assert_close(value, expected)
    assert_close(grads_of(value, game.g_params), grads_of(expected, game.g_params))
    if K > 1:  # the average is not the last value
        last = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, outer_fn=outer_of(game, outer))(
            game.d_params, state, *game.args)
        assert not torch.allclose(value, last)


# --------------------------------------------------------------------------------------------------------------
# 10. outer_fn, K = 0 of unrolled_params, determinism
# --------------------------------------------------------------------------------------------------------------


def test_default_outer_fn_is_minus_inner_fn() -> None:
    game = make_game(seed=20)
    opt = OPTIMIZERS["adam"]
    state = opt.init(game.d_params)
    default = unroll.surrogate_loss(game.d_loss, 2, optimizer=opt)(game.d_params, state, *game.args)
    explicit = unroll.surrogate_loss(game.d_loss, 2, optimizer=opt, outer_fn=lambda p, *a: -game.d_loss(p, *a))(
        game.d_params, state, *game.args)
    theta_k, _ = unroll.unrolled_params(game.d_loss, 2, optimizer=opt)(game.d_params, state, *game.args)
    assert torch.equal(default, explicit)
    assert_close(default, minimax_value(game, theta_k, game.g_params))
    assert_close(grads_of(default, game.g_params), grads_of(explicit, game.g_params))


def test_custom_outer_fn_non_saturating() -> None:
    game = make_game(seed=22)
    opt = OPTIMIZERS["adam-amsgrad"]
    state = opt.init(game.d_params)
    value = unroll.surrogate_loss(game.d_loss, 2, optimizer=opt, outer_fn=game.ns_loss)(
        game.d_params, state, *game.args)
    theta_k, _ = unroll.unrolled_params(game.d_loss, 2, optimizer=opt)(game.d_params, state, *game.args)
    # -log sigmoid(D(G(z))) by hand
    expected = -torch.log(torch.sigmoid(game.logits(theta_k, game.fake(game.g_params, game.z)))).mean()
    assert_close(value, expected)
    assert_close(grads_of(value, game.g_params), grads_of(expected, game.g_params))
    assert not torch.allclose(value, -game.d_loss(theta_k, *game.args))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_unrolled_params_k0_returns_inputs(optimizer: str) -> None:
    game = make_game(seed=23)
    opt = OPTIMIZERS[optimizer]
    state = opt.init(game.d_params)
    theta, new_state = unroll.unrolled_params(game.d_loss, 0, optimizer=opt)(game.d_params, state, *game.args)
    assert_trees_equal(theta, game.d_params)
    assert_trees_equal(new_state, state)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam-amsgrad", "rmsprop-centered-momentum"])
def test_deterministic(optimizer: str) -> None:
    game = make_game(seed=24, batchnorm=True)
    opt = OPTIMIZERS[optimizer]
    state = opt.init(game.d_params)
    surrogate = unroll.surrogate_loss(game.d_loss, 3, optimizer=opt)
    buffers = dict(game.D.named_buffers())
    runs = []
    for _ in range(2):
        value = surrogate(game.d_params, state, *game.args, buffers=buffers)
        runs.append((value, grads_of(value, {**game.g_params, **game.d_params})))
    assert_trees_equal(runs[1], runs[0])


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing gives the same values and gradients
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam-amsgrad", "rmsprop-centered-momentum"])
@pytest.mark.parametrize("resample", [False, True])
def test_checkpoint_matches_plain_unroll(optimizer: str, resample: bool) -> None:
    K = 3
    # BatchNorm in train mode: checkpointing re-runs inner_fn during backward, which must not leak either.
    game = make_game(seed=25, batchnorm=True)
    buffers = dict(game.D.named_buffers())
    before = snapshot(buffers)
    opt = OPTIMIZERS[optimizer]
    state = opt.init(game.d_params)
    batches = resampled_batches(game, K)
    step_args = (lambda k, g, real, z: (g, *batches[k])) if resample else None
    results = []
    for checkpoint in (False, True):
        value = unroll.surrogate_loss(game.d_loss, K, optimizer=opt, step_args=step_args, outer_fn=game.ns_loss,
                                      checkpoint=checkpoint)(game.d_params, state, *game.args, buffers=buffers)
        results.append((value, grads_of(value, {**game.g_params, **game.d_params})))
    assert_close(results[1], results[0])
    assert_trees_equal(buffers, before)
