r"""Evolution-strategies meta-gradients: antithetic ES and Persistent ES.

Both estimate the gradient of a Gaussian-smoothed loss from loss values alone, with no backward pass through the
unroll: :math:`\nabla_\phi\, \mathbb{E}_{\epsilon \sim N(0, \sigma^2 I)}[L(\phi + \epsilon)]
= \mathbb{E}[\epsilon\, L(\phi + \epsilon)] / \sigma^2`. Persistent ES (PES) is from Vicol, Metz & Sohl-Dickstein,
"Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent Evolution Strategies" (ICML 2021).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._checks import check_same_keys, check_scalar_loss, check_tensor_mapping
from ._engine import NonFiniteLossError
from ._types import Params, State
from .optimizer import Optimizer
from .unrolled import LossFn, train_step

ESEstimate = Callable[[Params, torch.Generator], Tuple[Dict[str, Tensor], Tensor]]
"""``estimate(phi, generator) -> (grads, loss)``."""


def es_gradient(loss_fn: Callable[[Dict[str, Tensor]], Tensor], *, sigma: float, particles: int,
                antithetic: bool = True, vmap: bool = True) -> ESEstimate:
    r"""Return ``estimate(phi, generator) -> (grads, loss)``: the Gaussian-smoothing (ES) gradient of ``loss_fn``.

    .. math:: \hat g = \frac{1}{N \sigma^2} \sum_{i=1}^{N} \epsilon_i\, f(\phi + \epsilon_i)

    with ``N = particles`` and :math:`\epsilon_i = \sigma e_i`, :math:`e_i \sim N(0, I)`. Antithetic: the second half
    of the particles are the first half negated, so :math:`\hat g = \frac{1}{2P\sigma}\sum_{i=1}^{P}
    (f(\phi + \sigma e_i) - f(\phi - \sigma e_i))\, e_i` over the ``P = N/2`` pairs. It is unbiased for
    :math:`\nabla_\phi\, \mathbb{E}[f(\phi + \epsilon)]` (the gradient itself for a quadratic f); its variance
    falls as 1/N, and with pairs the even-order terms of f cancel in each pair, so on a quadratic the estimate is
    :math:`\frac{1}{P}\sum_i e_i e_i^\top \nabla f(\phi)`: exact in expectation only.

    Args:
        loss_fn: ``loss_fn(phi) -> scalar tensor``, run under ``torch.no_grad`` (e.g. an unrolled outer loss).
        sigma: the perturbations' standard deviation, a finite number > 0.
        particles: N, the evaluations of ``loss_fn`` per estimate; even (>= 2) when ``antithetic``.
        antithetic: use pairs :math:`\pm\epsilon_i` (mirrored sampling).
        vmap: evaluate the particles with ``torch.func.vmap`` (``loss_fn`` must then be vmap-compatible, with no
            random ops); ``False`` loops over them. Both give the same numbers.

    ``estimate`` draws, for every name of ``phi`` in order, ``torch.randn((P or N, *shape), generator=generator)``
    in the tensor's dtype and device (so ``generator`` must be on phi's device): the same generator state gives
    the same estimate. ``loss`` is the mean of the N evaluated losses; a non-finite one raises
    ``FloatingPointError``. Cost: N calls of ``loss_fn``.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    sigma = _check_sigma(sigma)
    antithetic = bool(antithetic)
    particles = _check_particles(particles, antithetic)

    def one_loss(perturbed: Dict[str, Tensor]) -> Tensor:
        value = loss_fn(perturbed)
        check_scalar_loss(value, "loss_fn")
        return value

    def estimate(phi: Params, generator: torch.Generator) -> Tuple[Dict[str, Tensor], Tensor]:
        _check_phi(phi)
        _check_generator(generator)
        perturbations = _perturbations(phi, particles, sigma, generator, antithetic)
        with torch.no_grad():
            losses = _evaluate(one_loss, ({n: p.detach() + perturbations[n] for n, p in phi.items()},), vmap)
        bad = (~torch.isfinite(losses)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise FloatingPointError(f"loss_fn returned a non-finite value ({float(losses[i])}) at particle {i} "
                                     f"(phi plus its perturbation); lower sigma or check loss_fn there")
        return _weighted_sum(perturbations, losses, sigma), losses.mean()

    return estimate


class PESState(NamedTuple):
    """The particles of :func:`pes`; every tensor of ``params``, ``state`` and ``xi`` has a leading particle
    dimension (``+`` particles first, then their ``-`` partners)."""

    params: Dict[str, Tensor]
    """Each particle's inner parameters theta^t."""
    state: State
    """Each particle's optimizer state (``state["step"]`` included)."""
    xi: Dict[str, Tensor]
    """Each particle's accumulated perturbation of phi since the last reset (PES); zeros for truncated ES."""
    t: int
    """Inner steps taken since the last reset, a multiple of T below ``horizon``."""
    initial_params: Dict[str, Tensor]
    """The (unstacked) parameters every particle restarts from after ``horizon`` steps."""
    initial_state: State
    """The optimizer state every particle restarts from."""


class PES(NamedTuple):
    """The two pure functions of :func:`pes`: ``init(params, state, phi) -> PESState`` and
    ``step(phi, pes_state, *args, generator) -> (grads, pes_state, loss)``."""

    init: Callable[[Params, State, Params], PESState]
    step: Callable[..., Tuple[Dict[str, Tensor], PESState, Tensor]]


def pes(inner_fn: LossFn, T: int, *, optimizer: Optimizer, horizon: int, sigma: float, particles: int,
        outer_fn: Optional[LossFn] = None, persistent: bool = True, vmap: bool = True) -> PES:
    r"""Persistent Evolution Strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021) over windows of T inner steps.

    Each ``step`` draws :math:`\epsilon_i = \sigma e_i` for the ``P = N/2`` pairs (``N = particles``;
    :math:`\epsilon_{i+P} = -\epsilon_i`), unrolls T steps of ``optimizer`` on ``inner_fn(theta, phi + eps_i,
    *args)`` from each particle's own carried (theta, state), and scores particle i by its window loss
    :math:`L_i = \frac{1}{T}\sum_{k=1}^{T} \mathrm{outer\_fn}(\theta_i^{t+k}, \phi + \epsilon_i, *args)`. With
    :math:`\xi_i \leftarrow \xi_i + \epsilon_i`, the sum of particle i's perturbations since its reset,

    .. math:: \hat g = \frac{1}{N\sigma^2}\sum_{i=1}^{N} \xi_i L_i
              = \frac{1}{N\sigma^2}\sum_{i=1}^{P} \xi_i\,(L_i - L_{i+P})

    (the paper's PES estimator with antithetic pairs, N counting every particle). Its expectation is the gradient,
    with respect to the phi shared by every window since the reset, of the Gaussian-smoothed loss of this window;
    averaged over the ``horizon / T`` windows of a horizon, that of the smoothed mean of ``outer_fn`` over
    theta^1..theta^horizon (what ``surrogate_loss(inner_fn, horizon, average_over_steps=True)`` differentiates; the
    same gradient when that mean is quadratic in phi). The price is variance, which grows with the windows since
    the reset. After ``horizon`` inner steps every particle restarts from the ``init`` (params, state), xi = 0.

    ``persistent=False`` is the paper's truncated ES: every window starts all particles from one (theta, state),
    carried by one more particle with the unperturbed phi, and :math:`\hat g = \frac{1}{N\sigma^2}\sum_i
    \epsilon_i L_i`: in expectation the smoothed gradient of the window's loss with its start held constant
    (truncated backpropagation's gradient, smoothed). Biased; for comparison. ``xi`` stays zero.

    Args:
        inner_fn: ``inner_fn(params, phi, *args)``, the loss the inner optimizer minimises.
        T: inner steps per window (>= 1).
        optimizer: the inner optimizer.
        horizon: inner steps between resets, a multiple of T.
        sigma, particles: as in :func:`es_gradient` (particles even, >= 2).
        outer_fn: ``outer_fn(params, phi, *args)``; default ``-inner_fn``.
        persistent: PES (True) or truncated ES (False).
        vmap: run the particles' windows with ``torch.func.vmap`` (no random ops in the losses); ``False`` loops
            over them, with the same numbers.

    ``step(phi, pes_state, *args, generator)`` returns the estimate, the new state and the mean window loss of
    the N perturbed particles; the noise comes from ``generator`` only, drawn as in :func:`es_gradient`. Nothing
    is differentiated and the inputs are left untouched. Cost per step: N (N + 1 truncated) windows of T
    optimizer steps and T ``outer_fn`` calls each; memory: N copies of (theta, state) and of phi.
    A non-finite inner loss or window value raises :class:`unroll.NonFiniteLossError` naming the function and
    the inner step counted from the last reset.
    """
    sigma = _check_sigma(sigma)
    particles = _check_particles(particles, True)
    T = _check_count(T, "T (the inner steps per window)", 1)
    horizon = _check_count(horizon, "horizon (the inner steps between resets)", T)
    if horizon % T:
        raise ValueError(f"horizon must be a multiple of T = {T}, got {horizon}")
    if outer_fn is not None and not callable(outer_fn):
        raise TypeError(f"outer_fn must be callable or None, got {type(outer_fn).__name__}")
    committed = train_step(inner_fn, optimizer=optimizer, check_finite=False)  # checks inner_fn and optimizer
    outer_name = "outer_fn" if outer_fn is not None else "inner_fn (the default outer loss is -inner_fn)"
    # The unperturbed particle of truncated ES rides along in the same batch.
    batch = particles if persistent else particles + 1

    def outer(params: Dict[str, Tensor], phi: Dict[str, Tensor], args: Tuple[Any, ...]) -> Tensor:
        value = inner_fn(params, phi, *args) if outer_fn is None else outer_fn(params, phi, *args)
        check_scalar_loss(value, outer_name)
        return value if outer_fn is not None else -value

    def init(params: Params, state: State, phi: Params) -> PESState:
        optimizer.check_state(params, state)
        _check_phi(phi)
        # Own copies: a later in-place update of the caller's tensors must not move the reset point.
        own_params, own_state = pytree.tree_map(lambda x: x.detach().clone(), (dict(params), state))
        return _fresh(own_params, own_state, phi, particles)

    def step(phi: Params, pes_state: PESState, *args: Any, generator: torch.Generator
             ) -> Tuple[Dict[str, Tensor], PESState, Tensor]:
        _check_phi(phi)
        _check_generator(generator)
        _check_pes_state(pes_state, phi, particles, T, horizon)
        eps = _perturbations(phi, particles, sigma, generator, True)
        phis = {n: p.detach() + eps[n] for n, p in phi.items()}
        starts: Tuple[Any, Any] = (pes_state.params, pes_state.state)
        if not persistent:
            phis = {n: torch.cat([v, phi[n].detach()[None]]) for n, v in phis.items()}
            starts = _stacked(pytree.tree_map(lambda x: x[0], starts), batch)

        def window(params: Dict[str, Tensor], state: State, phi_i: Dict[str, Tensor]) -> Tuple[Any, ...]:
            inner_losses, outer_values = [], []
            for _ in range(T):
                params, state, loss = committed(params, state, phi_i, *args)
                inner_losses.append(loss)
                outer_values.append(outer(params, phi_i, args))
            return params, state, torch.stack(inner_losses), torch.stack(outer_values)

        with torch.no_grad():
            end_params, end_state, inner_losses, outer_values = _evaluate(window, (*starts, phis), vmap)
        _raise_if_nonfinite(inner_losses, outer_values, pes_state.t, outer_name)
        losses = outer_values[:particles].mean(dim=1)
        if persistent:
            xi = {n: pes_state.xi[n] + eps[n] for n in eps}
            grads = _weighted_sum(xi, losses, sigma)
            carried = (end_params, end_state)
        else:
            xi = pes_state.xi
            grads = _weighted_sum(eps, losses, sigma)
            carried = _stacked(pytree.tree_map(lambda x: x[-1], (end_params, end_state)), particles)
        t = pes_state.t + T
        if t == horizon:
            new_state = _fresh(pes_state.initial_params, pes_state.initial_state, phi, particles)
        else:
            new_state = PESState(carried[0], carried[1], xi, t, pes_state.initial_params, pes_state.initial_state)
        return grads, new_state, losses.mean()

    return PES(init, step)


def _fresh(params: Dict[str, Tensor], state: State, phi: Params, particles: int) -> PESState:
    stacked_params, stacked_state = _stacked((params, state), particles)
    xi = {n: torch.zeros((particles, *p.shape), dtype=p.dtype, device=p.device) for n, p in phi.items()}
    return PESState(stacked_params, stacked_state, xi, 0, params, state)


def _stacked(tree: Any, count: int) -> Any:
    """Every tensor of ``tree`` repeated along a new leading particle dimension (fresh memory)."""
    return pytree.tree_map(lambda x: x.detach().unsqueeze(0).repeat(count, *([1] * x.dim())), tree)


def _perturbations(phi: Params, particles: int, sigma: float, generator: torch.Generator,
                   antithetic: bool) -> Dict[str, Tensor]:
    """``sigma * e`` per name of ``phi``, in order, shape ``(particles, *shape)``; antithetic: the second half is
    the first half negated. All noise is drawn here, outside any vmap, from ``generator`` alone."""
    draws = particles // 2 if antithetic else particles
    noise = {}
    for name, p in phi.items():
        e = torch.randn((draws, *p.shape), generator=generator, dtype=p.dtype, device=p.device)
        noise[name] = sigma * (torch.cat([e, -e]) if antithetic else e)
    return noise


def _weighted_sum(weights: Dict[str, Tensor], losses: Tensor, sigma: float) -> Dict[str, Tensor]:
    r""":math:`\frac{1}{N\sigma^2}\sum_i w_i L_i` for every name, N the number of losses."""
    scale = 1.0 / (losses.shape[0] * sigma ** 2)
    return {n: torch.tensordot(losses.to(w.dtype), w, dims=1) * scale for n, w in weights.items()}


def _evaluate(fn: Callable[..., Any], inputs: Tuple[Any, ...], use_vmap: bool) -> Any:
    """``fn`` on every particle of ``inputs`` (trees of tensors with a leading particle dimension), results
    stacked: by ``torch.func.vmap`` or by a loop with the same arithmetic."""
    if use_vmap:
        return torch.func.vmap(fn)(*inputs)
    count = pytree.tree_leaves(inputs)[0].shape[0]
    results = [fn(*pytree.tree_map(lambda x, i=i: x[i], inputs)) for i in range(count)]
    columns = zip(*(pytree.tree_leaves(r) for r in results))
    return pytree.tree_unflatten([torch.stack(c) for c in columns], pytree.tree_structure(results[0]))


def _raise_if_nonfinite(inner_losses: Tensor, outer_values: Tensor, t: int, outer_name: str) -> None:
    """Raise for the first non-finite value in evaluation order: inner loss at theta^k, then outer at theta^k+1."""
    dtype = torch.promote_types(inner_losses.dtype, outer_values.dtype)
    table = torch.stack([inner_losses.to(dtype), outer_values.to(dtype)], dim=2).flatten(1)  # (batch, 2T)
    bad = ~torch.isfinite(table)
    if not bool(bad.any()):
        return
    column = int(bad.any(dim=0).nonzero()[0, 0])
    particle = int(bad[:, column].nonzero()[0, 0])  # the first particle with it
    k, is_outer = divmod(column, 2)
    raise NonFiniteLossError(t + k, float(table[particle, column]), "loss", outer_name if is_outer else "inner_fn")


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma (the perturbations' standard deviation) must be a number, got "
                        f"{type(sigma).__name__}: {sigma!r}")
    if not 0 < float(sigma) < math.inf:
        raise ValueError(f"sigma (the perturbations' standard deviation) must be positive and finite, got {sigma}")
    return float(sigma)


def _check_count(value: Any, label: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{label} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{label} must be >= {minimum}, got {value}")
    return int(value)


def _check_particles(particles: Any, antithetic: bool) -> int:
    count = _check_count(particles, "particles", 2 if antithetic else 1)
    if antithetic and count % 2:
        raise ValueError(f"particles must be even (antithetic pairs +eps, -eps), got {count}")
    return count


def _check_phi(phi: Any) -> None:
    check_tensor_mapping(phi, "phi", floating=True)


def _check_generator(generator: Any) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (the only source of noise), got "
                        f"{type(generator).__name__}")


def _check_pes_state(pes_state: Any, phi: Params, particles: int, T: int, horizon: int) -> None:
    if not isinstance(pes_state, PESState):
        raise TypeError(f"pes_state must be the PESState from init or step, got {type(pes_state).__name__}")
    check_same_keys(pes_state.xi, phi, "phi", "the phi given to init")
    for name, p in phi.items():
        if pes_state.xi[name].shape != (particles, *p.shape):
            raise ValueError(f"phi[{name!r}] has shape {tuple(p.shape)}, but pes_state holds "
                             f"{tuple(pes_state.xi[name].shape)} (particles, *shape) for it")
    if not (isinstance(pes_state.t, int) and 0 <= pes_state.t < horizon and pes_state.t % T == 0):
        raise ValueError(f"pes_state.t must be a multiple of T = {T} below horizon = {horizon}, got {pes_state.t!r}")
