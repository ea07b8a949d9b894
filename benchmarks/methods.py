"""Four ways to compute one unrolled generator gradient d f_K / d theta_G (Metz et al., 2017, Eq. 12).

Each ``make_*`` takes a :class:`~benchmarks.models.Problem` and K and returns a zero-argument function that
computes the gradient with respect to the generator's parameters (a tuple in ``generator.parameters()``
order). What a training step repeats (the generator's forward pass, taking a copy of the discriminator
optimizer's current state, the unroll and the backward pass) happens inside that function; building closures
and modules happens once, outside. Every method starts from the same Adam state (``problem.d_optimizer``, see
:func:`benchmarks.models.steady_adam`), uses the same fixed minibatch at every unrolled step, and the zero-sum
generator loss f = -L_D of App. A.

``higher`` and ``torchopt`` are optional (the ``bench`` extra) and imported only when their method is built.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

import unroll

from .models import BETAS, Problem, d_loss

GradFn = Callable[[], Tuple[Tensor, ...]]

METHODS = ("unroll", "higher", "torchopt", "first_order")
OPTIONAL = {"higher": "higher", "torchopt": "torchopt"}  # method -> module it needs

# torchopt's MetaAdam divides by sqrt(v_hat + eps_root) + eps. With eps_root = 0 the derivative of sqrt at the
# exactly-zero v of a dead ReLU unit is infinite and the mixture's meta-gradient is NaN. eps_root = 1e-8 shifts
# the updates enough to move the gradient by 2e-5 (mixture) and 1.2e-5 (conv) relative at K = 5, more than the
# 1e-5 we check; 1e-16 removes the NaN and leaves the gradient equal to unroll's to ~1e-7.
TORCHOPT_EPS_ROOT = 1e-16


def _own_copy(problem: Problem) -> Problem:
    # Each method gets its own modules: torchopt rebinds the module's parameters, the first-order loop steps them.
    return copy.deepcopy(problem)


def make_unroll(problem: Problem, K: int, *, stop_grad: bool = False, **surrogate_kwargs: object) -> GradFn:
    """``unroll.surrogate_loss`` with ``unroll.adam``; extra keyword arguments go to ``surrogate_loss``."""
    p = _own_copy(problem)
    G, D = p.generator, p.discriminator
    opt, _ = unroll.from_torch(p.d_optimizer, D)

    def inner(params: Dict[str, Tensor], real: Tensor, fake: Tensor) -> Tensor:
        return d_loss(lambda x: torch.func.functional_call(D, params, (x,)), real, fake)

    surrogate = unroll.surrogate_loss(inner, K, stop_grad, optimizer=opt, **surrogate_kwargs)
    d_params = dict(D.named_parameters())
    g_params = tuple(G.parameters())

    def run() -> Tuple[Tensor, ...]:
        _, state = unroll.from_torch(p.d_optimizer, D)
        fake = G(p.noise)
        value = surrogate(d_params, state, p.real, fake)
        return torch.autograd.grad(value, g_params)

    return run


def make_higher(problem: Problem, K: int) -> GradFn:
    """``higher.innerloop_ctx`` around ``torch.optim.Adam`` (copy_initial_weights=False, track_higher_grads=True)."""
    import higher

    p = _own_copy(problem)
    G, D = p.generator, p.discriminator
    g_params = tuple(G.parameters())

    def run() -> Tuple[Tensor, ...]:
        fake = G(p.noise)
        # innerloop_ctx copies the optimizer's state; p.d_optimizer itself is never stepped.
        context = higher.innerloop_ctx(D, p.d_optimizer, copy_initial_weights=False, track_higher_grads=True)
        with context as (fD, diffopt):
            for _ in range(K):
                diffopt.step(d_loss(fD, p.real, fake))
            value = -d_loss(fD, p.real, fake)
        return torch.autograd.grad(value, g_params)

    return run


def make_torchopt(problem: Problem, K: int) -> GradFn:
    """``torchopt.MetaAdam`` stepping the module in place, restored afterwards with ``recover_state_dict``.

    torchopt cannot read a torch.optim state, so the Adam moments and step count are put into MetaAdam's own
    state (``ScaleByAdamState``) before the first step.
    """
    import torchopt

    p = _own_copy(problem)
    G, D = p.generator, p.discriminator
    g_params = tuple(G.parameters())
    torch_state = p.d_optimizer.state

    def load_state(d_opt: torchopt.MetaAdam) -> None:
        flat, _ = torchopt.pytree.tree_flatten_as_tuple(d_opt.param_containers_groups[0])
        states = [torch_state[t] for t in flat]  # torchopt orders parameters by sorted name, so look them up
        adam_state, *rest = d_opt.impl.init(flat)
        adam_state = adam_state._replace(
            mu=tuple(s["exp_avg"] for s in states), nu=tuple(s["exp_avg_sq"] for s in states),
            count=tuple(torch.tensor(int(s["step"]), dtype=torch.int64, device=s["exp_avg"].device) for s in states))
        d_opt.load_state_dict([(adam_state, *rest)])

    def run() -> Tuple[Tensor, ...]:
        fake = G(p.noise)
        initial = torchopt.extract_state_dict(D)
        try:
            d_opt = torchopt.MetaAdam(D, lr=p.lr, betas=BETAS, eps_root=TORCHOPT_EPS_ROOT)
            load_state(d_opt)
            for _ in range(K):
                d_opt.step(d_loss(D, p.real, fake))
            value = -d_loss(D, p.real, fake)
            return torch.autograd.grad(value, g_params)
        finally:
            torchopt.recover_state_dict(D, initial)

    return run


def make_first_order(problem: Problem, K: int) -> GradFn:
    """The floor: K plain discriminator steps (torch.optim.Adam, no graph kept) + one generator gradient.

    That is K + 1 discriminator gradient evaluations; the result is the gradient of ``surrogate_loss`` with
    ``stop_grad=True`` (the first term of Eq. 12 only).
    """
    p = _own_copy(problem)
    G, D = p.generator, p.discriminator
    d_params = tuple(D.parameters())
    start = [t.detach().clone() for t in d_params]
    start_state = [p.d_optimizer.state[t] for t in d_params]
    g_params = tuple(G.parameters())

    def run() -> Tuple[Tensor, ...]:
        with torch.no_grad():  # back to the common starting point (a few thousand floats, negligible)
            for t, t0 in zip(d_params, start):
                t.copy_(t0)
        d_opt = torch.optim.Adam(d_params, lr=p.lr, betas=BETAS)
        for t, state in zip(d_params, start_state):  # copies: torch.optim updates its state in place
            d_opt.state[t] = {k: v.clone() for k, v in state.items()}
        fake = G(p.noise)
        fake_const = fake.detach()
        for _ in range(K):
            d_opt.zero_grad(set_to_none=True)
            d_loss(D, p.real, fake_const).backward()
            d_opt.step()
        value = -d_loss(D, p.real, fake)
        return torch.autograd.grad(value, g_params)

    return run


MAKERS: Dict[str, Callable[[Problem, int], GradFn]] = {
    "unroll": make_unroll,
    "higher": make_higher,
    "torchopt": make_torchopt,
    "first_order": make_first_order,
}


# Variants of the unroll method carry ``surrogate_loss`` options in their name, so that a name alone (e.g. the
# argument of the memory subprocess) says what to build: "unroll:truncate=10:checkpoint" is
# ``make_unroll(problem, K, truncate=10, checkpoint=True)``, and "unroll:checkpoint=8" keeps at most 8 stored states.
# Options are written in this order, each at most once.
OPTION_SEPARATOR = ":"
UNROLL_OPTIONS: Dict[str, type] = {"truncate": int, "checkpoint": bool}  # a bare flag is True; checkpoint=N an int


def unroll_method(*, truncate: Optional[int] = None, checkpoint: Union[bool, int] = False) -> str:
    """The method name of ``make_unroll`` with these ``surrogate_loss`` options; :func:`parse_method` inverts it."""
    parts = ["unroll"]
    if truncate is not None:
        parts.append(f"truncate={int(truncate)}")
    if checkpoint is True:
        parts.append("checkpoint")
    elif checkpoint:
        parts.append(f"checkpoint={int(checkpoint)}")
    return OPTION_SEPARATOR.join(parts)


def parse_method(method: str) -> Tuple[str, Dict[str, object]]:
    """``(base method, surrogate_loss options)`` of a method name, e.g. ``("unroll", {"truncate": 10})``."""
    base, *parts = method.split(OPTION_SEPARATOR)
    if base not in MAKERS:
        raise ValueError(f"unknown method {method!r}: it must start with one of {METHODS}")
    if parts and base != "unroll":
        raise ValueError(f"method {method!r}: only unroll takes options, {base} has none")
    options: Dict[str, object] = {}
    for part in parts:
        name, has_value, value = part.partition("=")
        kind = UNROLL_OPTIONS.get(name)
        if kind is None:
            raise ValueError(f"method {method!r}: unknown option {name!r}; options are {tuple(UNROLL_OPTIONS)}")
        if name in options:
            raise ValueError(f"method {method!r}: option {name!r} given twice")
        if kind is bool and not has_value:
            options[name] = True
        else:
            try:
                options[name] = int(value)
            except ValueError:
                raise ValueError(f"method {method!r}: {name} needs an integer value, got {value!r}") from None
            if kind is bool and options[name] < 1:  # type: ignore[operator]
                raise ValueError(f"method {method!r}: {name}=N keeps N >= 1 stored states")
    canonical = unroll_method(**options) if parts else base  # type: ignore[arg-type]
    if canonical != method:  # one name per variant, so that its result rows never split
        raise ValueError(f"method {method!r}: write it as {canonical!r} (options in the order "
                         f"{tuple(UNROLL_OPTIONS)})")
    return base, options


def describe(method: str) -> str:
    """A method name as the page shows it: ``unroll:truncate=10:checkpoint`` -> ``truncate=10, checkpoint=True``."""
    base, options = parse_method(method)
    if not options:
        return base
    return ", ".join(f"{name}={value}" for name, value in options.items())


def warm_up(method: str) -> Tuple[str, int]:
    """A small ``(method, K)`` that runs the same code as ``method`` at any K, to pay one-off costs first.

    K = 1 for most methods; a truncated unroll needs a constant step and a differentiated one (truncate=1, K=2).
    """
    _, options = parse_method(method)
    if options.get("truncate") is None:
        return method, 1
    return unroll_method(truncate=1, checkpoint=bool(options.get("checkpoint"))), 2


# The memory-bounding option (recompute each unrolled step in the backward pass). The suite compares it
# with the plain unroll at K = 100 on the conv model as soon as unroll.surrogate_loss accepts ``checkpoint``.
CHECKPOINT_METHOD = unroll_method(checkpoint=True)


def _missing_options(options: Dict[str, object]) -> Optional[str]:
    accepted = inspect.signature(unroll.surrogate_loss).parameters
    missing = [name for name in options if name not in accepted]
    return f"unroll.surrogate_loss has no {', '.join(f'`{n}`' for n in missing)} option yet" if missing else None


def checkpoint_unavailable() -> Optional[str]:
    """None if ``unroll.surrogate_loss`` has the ``checkpoint`` option, else why the comparison is skipped."""
    return unavailable(CHECKPOINT_METHOD)


def make(method: str, problem: Problem, K: int) -> GradFn:
    """The gradient function of ``method``: one of METHODS, or an unroll variant named by :func:`unroll_method`."""
    base, options = parse_method(method)
    if options:
        return make_unroll(problem, K, **options)  # type: ignore[arg-type]
    return MAKERS[base](problem, K)


def unavailable(method: str) -> Optional[str]:
    """None if ``method`` can run here, else the reason it cannot."""
    base, options = parse_method(method)
    if options:
        return _missing_options(options)
    module = OPTIONAL.get(base)
    if module is None:
        return None
    try:
        __import__(module)
    except Exception as error:  # an ImportError, or a broken install failing at import time
        return f"import {module} failed: {type(error).__name__}: {error}"
    return None
