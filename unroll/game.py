"""Unrolling several players at once: the look-ahead through a game's joint dynamics (Metz et al. 2017, Sec. 4)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from ._checks import check_same_keys, check_scalar_loss, check_tensor_mapping, check_unroll_steps
from ._engine import detach, gradient_fn, raise_if_nonfinite, step_record, under_torch_func
from ._types import Params, State
from .optimizer import Optimizer

Players = Mapping[str, Params]
"""Every player's parameters, keyed by player: ``{"g": {"w": ...}, "d": {"w": ...}}``."""

GameLoss = Callable[..., Tensor]
"""``loss(players, *args) -> scalar tensor``: one player's loss, as a function of every player's parameters."""


def unrolled_game(losses: Mapping[str, GameLoss], K: int, stop_grad: bool = False, *,
                  optimizers: Mapping[str, Optimizer], alternating: bool = False, check_finite: bool = True
                  ) -> Callable[..., Tuple[Dict[str, Dict[str, Tensor]], Dict[str, State]]]:
    r"""Return ``run(players, states, *args) -> (players_K, states_K)``: K steps of the game's joint dynamics.

    Every player ``p`` of ``optimizers`` (the *moving* players) takes one step per unrolled step on its own loss,
    differentiated with respect to its own parameters only:

    .. math:: \theta_p^{k+1} = \mathrm{step}_p\big(\theta_p^k,\ \nabla_{\theta_p} \mathrm{loss}_p(\theta^k, *args)\big)

    where :math:`\theta^k` holds every player's parameters after k steps: all players step from the same
    :math:`\theta^k` (simultaneous), or, with ``alternating``, one after the other in the order of ``optimizers``,
    each seeing the parameters the players before it just took. Players of ``players`` without an optimizer stay
    fixed. Every step stays differentiable with respect to ``players``, ``states`` and ``args`` (unless
    ``stop_grad``), so a player's loss at :math:`\theta^K` can be differentiated through the whole look-ahead.

    One call covers the unrolled updates of the paper and the two extensions its Discussion proposes
    (Metz, Poole, Pfau & Sohl-Dickstein, "Unrolled Generative Adversarial Networks", ICLR 2017, Sec. 4):

    - the paper's unrolling, ``optimizers={"d": d_opt}``: G's loss at :math:`(\theta_G, \theta_D^K)` (Eq. 9),
      the same as :func:`unroll.surrogate_loss`;
    - unrolling G when updating D, ``optimizers={"g": g_opt}``: D's loss at :math:`(\theta_G^K, \theta_D)`,
      "letting the discriminator react to how the generator would move" (also :func:`unroll.surrogate_loss`
      with the roles swapped);
    - unrolling sequences of G and D updates, ``optimizers={"g": g_opt, "d": d_opt}``: G's loss at
      :math:`(\theta_G, \theta_D^K)` where :math:`\theta_D^K` answers a G that keeps learning too, so "updates
      become recursive". A single ``inner_fn`` cannot express this: the joint step follows each player's
      gradient of its own loss, which is not the gradient of any one scalar (outside potential games).

    Args:
        losses: ``losses[p](players, *args)``, the scalar loss player ``p`` minimises; ``players`` maps every
            player to its parameter dict. One entry per moving player (the keys of ``optimizers``).
        K: number of unrolled steps (>= 0); one step moves every moving player once.
        stop_grad: treat the unrolled parameters as constants (no graph is built through the unroll).
        optimizers: the moving players' optimizers, e.g. ``{"d": unroll.sgd(0.1)}``; ``states[p]`` must come
            from ``optimizers[p].init``.
        alternating: players step one after the other in the order of ``optimizers`` (Gauss-Seidel) instead of
            together (Jacobi).
        check_finite: raise :class:`unroll.NonFiniteLossError` if a loss is NaN or infinite (one
            synchronisation per call; skipped under ``torch.func.vmap``).

    ``players_K`` holds every player (fixed ones unchanged), ``states_K`` the moving players' optimizer states.
    Composes with ``torch.func.grad`` and ``vmap``.
    """
    K = check_unroll_steps(K)
    _check_game(losses, optimizers)
    movers = list(optimizers)

    def run(players: Players, states: Mapping[str, State], *args: Any
            ) -> Tuple[Dict[str, Dict[str, Tensor]], Dict[str, State]]:
        _check_players(players, states, optimizers)
        current = {p: dict(params) for p, params in players.items()}
        new_states = {p: states[p] for p in movers}
        if stop_grad:
            current, new_states, args = detach((current, new_states, args))
        differentiate = gradient_fn(functorch=under_torch_func() or torch.is_inference_mode_enabled(),
                                    records_graph=torch.is_grad_enabled())
        records: List[Tensor] = []
        for _ in range(K):
            start, current = current, dict(current)
            for p in movers:
                # Simultaneous: every player differentiates at theta^k; alternating: at the latest parameters.
                grads, value = differentiate(_own_loss(losses[p], p, current if alternating else start),
                                             start[p], not stop_grad, args)
                records.append(step_record(value, grads) if check_finite else value)
                # Under stop_grad the step records no graph at all, not even to tensor hyperparameters.
                with torch.no_grad() if stop_grad else contextlib.nullcontext():
                    current[p], new_states[p] = optimizers[p].apply(start[p], grads, new_states[p])
        if check_finite and records:
            raise_if_nonfinite(records, lambda k: (k // len(movers), f"losses[{movers[k % len(movers)]!r}]"))
        return current, new_states

    return run


def _own_loss(loss: GameLoss, p: str, players: Dict[str, Dict[str, Tensor]]) -> Callable[..., Tensor]:
    """Player ``p``'s loss as a function of its own parameters, the other players' held at ``players``."""
    def value_of(own: Dict[str, Tensor], *args: Any) -> Tensor:
        value = loss({**players, p: own}, *args)
        check_scalar_loss(value, f"losses[{p!r}]")
        return value
    return value_of


def _check_game(losses: Any, optimizers: Any) -> None:
    if not isinstance(losses, Mapping) or not isinstance(optimizers, Mapping):
        raise TypeError(f"losses and optimizers must be mappings keyed by player, got "
                        f"{type(losses).__name__} and {type(optimizers).__name__}")
    check_same_keys(optimizers, losses, "losses", "optimizers (the moving players)")
    for p, loss in losses.items():
        if not callable(loss):
            raise TypeError(f"losses[{p!r}] must be callable, got {type(loss).__name__}")
    for p, opt in optimizers.items():
        if not isinstance(opt, Optimizer):
            raise TypeError(f"optimizers[{p!r}] must be an unroll.Optimizer (unroll.adam, unroll.sgd, ..., "
                            f"unroll.from_torch, unroll.param_groups or unroll.custom_optimizer), "
                            f"got {type(opt).__name__}")


def _check_players(players: Any, states: Any, optimizers: Mapping[str, Optimizer]) -> None:
    if not isinstance(players, Mapping):
        raise TypeError(f"players must map each player to its parameter dict, got {type(players).__name__}")
    missing = [p for p in optimizers if p not in players]
    if missing:
        raise KeyError(f"players has no parameters for the moving players {missing}")
    for p, params in players.items():
        check_tensor_mapping(params, f"players[{p!r}]", floating=True)
    if not isinstance(states, Mapping):
        raise TypeError(f"states must map each moving player to its optimizer state, got {type(states).__name__}")
    check_same_keys(optimizers, states, "states", "optimizers (the moving players)")
    for p, opt in optimizers.items():
        opt.check_state(players[p], states[p])
