"""unroll.adamw/adagrad/adamax/nadam/radam and Adam's decoupled weight decay: the checks of test_optimizers.py
(torch.optim parity, purity, float64 gradients, finite meta-gradients at zero gradients), plus torch.func.grad/vmap
with a batched step, surrogate_loss gradients and from_torch continuation."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Dict, List, Mapping, Tuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor

import unroll

# Shared with the core tests (tests/ is on sys.path under pytest's default import mode).
from test_from_torch import _max_abs_diff, _module, _torch_step
from test_optimizers import (
    PARITY_ATOL,
    PARITY_STEPS,
    _assert_finite_meta_gradients,
    _assert_keeps_dtype_and_shape,
    _assert_parity,
    _assert_step_gradients,
    _assert_step_is_pure,
    _case_id,
    _make,
    _params,
    _run,
)

GradSequence = Callable[..., List[Dict[str, Tensor]]]  # the random_grads fixture (see conftest.py)
Case = Tuple[str, Dict[str, Any]]


def _grid(name: str, fixed: Dict[str, Any], **choices: Tuple[Any, ...]) -> List[Case]:
    """One case per combination of ``choices`` (each option's values), on top of ``fixed``."""
    return [(name, {**fixed, **dict(zip(choices, values))}) for values in itertools.product(*choices.values())]


BOOL = (False, True)
# Every boolean option crossed with zero / nonzero weight decay and the optimizer's own numeric option.
PARITY_GRID = (
    _grid("adam", dict(lr=0.01, decoupled_weight_decay=True), amsgrad=BOOL, maximize=BOOL, weight_decay=(0.0, 0.1))
    + _grid("adamw", dict(lr=0.01), amsgrad=BOOL, maximize=BOOL, weight_decay=(0.0, 0.1))
    + _grid("adagrad", dict(lr=0.05), maximize=BOOL, weight_decay=(0.0, 0.1), lr_decay=(0.0, 0.01),
            initial_accumulator_value=(0.0, 0.1))
    + _grid("adamax", dict(lr=0.01), maximize=BOOL, weight_decay=(0.0, 0.1))
    + _grid("nadam", dict(lr=0.01), maximize=BOOL, decoupled_weight_decay=BOOL, weight_decay=(0.0, 0.1),
            momentum_decay=(4e-3, 0.05))
    + _grid("radam", dict(lr=0.01), maximize=BOOL, decoupled_weight_decay=BOOL, weight_decay=(0.0, 0.1))
)
OTHER_HYPERPARAMS: List[Case] = [
    ("adamw", dict(lr=1e-3, betas=(0.5, 0.999), eps=1e-6, weight_decay=0.3)),
    ("adagrad", dict(lr=0.1, eps=1e-6, initial_accumulator_value=1.0)),
    ("adamax", dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6)),
    ("nadam", dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6)),
    ("radam", dict(lr=0.02, betas=(0.5, 0.9), eps=1e-6)),  # rectifies from step 6 on, like beta2 = 0.999
]
# The plain configuration of each optimizer and ones that use every option it has.
RICH_OPTIONS: List[Case] = [
    ("adam", dict(lr=0.05, decoupled_weight_decay=True, weight_decay=0.1, amsgrad=True)),
    ("adamw", dict(lr=0.05)),
    ("adamw", dict(lr=0.05, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("adagrad", dict(lr=0.05)),
    ("adagrad", dict(lr=0.05, lr_decay=0.1, initial_accumulator_value=0.1, weight_decay=0.1, maximize=True)),
    ("adamax", dict(lr=0.05)),
    ("adamax", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("nadam", dict(lr=0.05)),
    ("nadam", dict(lr=0.05, momentum_decay=0.05, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
    ("radam", dict(lr=0.05)),
    ("radam", dict(lr=0.05, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]
# RAdam rectifies its step from t = 6 on (rho_t > 5): states warmed up this long reach that branch.
RECTIFIED_STEP = 6


# ---------------------------------------------------------------------------------------------- torch.optim parity

@pytest.mark.parametrize("case", PARITY_GRID + OTHER_HYPERPARAMS, ids=_case_id)
def test_matches_torch_optim_for_50_steps(case: Case, random_grads: GradSequence) -> None:
    _assert_parity(*case, random_grads)


def test_parity_grid_covers_every_option_combination() -> None:
    # Adam(decoupled) 2^3, AdamW 2^3, Adagrad 2^4, Adamax 2^2, NAdam 2^4, RAdam 2^3.
    assert len({_case_id(c) for c in PARITY_GRID}) == len(PARITY_GRID) == 8 + 8 + 16 + 4 + 16 + 8


def test_adamw_is_adam_with_decoupled_weight_decay(random_grads: GradSequence) -> None:
    adamw = unroll.adamw(lr=0.01, weight_decay=0.1, amsgrad=True)
    adam = unroll.adam(lr=0.01, weight_decay=0.1, amsgrad=True, decoupled_weight_decay=True)
    assert adamw.update.func is adam.update.func  # one update function, not a copy
    assert (adamw.name, adamw.buffers) == ("adamw", adam.buffers)
    assert "decoupled_weight_decay" not in adamw.hyperparams and adam.hyperparams["decoupled_weight_decay"]
    params = _params(torch.float32)
    grad_sequence = random_grads(params, 5, seed=3)
    pytree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0),
                    _run(adamw, params, grad_sequence), _run(adam, params, grad_sequence))


def test_init_matches_torch_optim_initial_state() -> None:
    params = _params(torch.float32)
    adagrad = unroll.adagrad(initial_accumulator_value=0.25).init(params)
    assert all(torch.equal(s, torch.full_like(params[k], 0.25)) for k, s in adagrad["sum"].items())
    nadam = unroll.nadam().init(params)
    assert all(m.shape == () and m.dtype == torch.float32 and m.item() == 1.0 for m in nadam["mu_product"].values())
    assert not unroll.nadam().packable  # see Optimizer.scalar_buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_step_keeps_dtype_and_shape(case: Case, dtype: torch.dtype, random_grads: GradSequence) -> None:
    _assert_keeps_dtype_and_shape(_make(*case), dtype, random_grads)


# ---------------------------------------------------------------------------------------------------------- purity

@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_step_is_pure(case: Case, random_grads: GradSequence) -> None:
    _assert_step_is_pure(_make(*case), random_grads)


# ------------------------------------------------------------------------------------------------ differentiability

# (case, warm-up steps, checked steps): from init and from a warm state; RAdam also across its rectification.
GRADCHECK_CASES = [(case, warm, n) for case in RICH_OPTIONS for warm, n in [(0, 1), (0, 3), (2, 3)]] + [
    (case, RECTIFIED_STEP - 2, 3) for case in RICH_OPTIONS if case[0] == "radam"]


@pytest.mark.parametrize("case, warm_steps, n_steps", GRADCHECK_CASES,
                         ids=[f"{_case_id(c)}-warm={w}-steps={n}" for c, w, n in GRADCHECK_CASES])
def test_step_gradients_match_finite_differences(case: Case, warm_steps: int, n_steps: int,
                                                 random_grads: GradSequence) -> None:
    """gradcheck (float64) w.r.t. lr, weight_decay, params, grads of every step and state buffers."""
    _assert_step_gradients(*case, warm_steps=warm_steps, n_steps=n_steps, random_grads=random_grads)


ZERO_GRAD_OPTIONS: List[Tuple[Case, Dict[str, Any]]] = [
    (("adamw", dict(lr=0.05, amsgrad=True)), dict(update_module="unroll.adam")),
    (("adagrad", dict(lr=0.05)), {}),
    (("adamax", dict(lr=0.05)), dict(uses_sqrt=False)),  # |g| and max(., |g| + eps): finite without help
    (("nadam", dict(lr=0.05)), {}),
    (("radam", dict(lr=0.05)), dict(steps=RECTIFIED_STEP + 1)),  # both sides of the rectification
]


@pytest.mark.parametrize("case, how", ZERO_GRAD_OPTIONS, ids=[_case_id(c) for c, _ in ZERO_GRAD_OPTIONS])
def test_zero_gradient_entries_give_finite_meta_gradients(case: Case, how: Dict[str, Any], mlp_params: Any,
                                                          mlp_forward: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_finite_meta_gradients(*case, mlp_params, mlp_forward, monkeypatch, **how)


# ------------------------------------------------------------------------------------------------------ torch.func

def _stack(trees: List[Any]) -> Any:
    return pytree.tree_map(lambda *xs: torch.stack(xs), *trees)


def _warm(optimizer: unroll.Optimizer, steps: int, seed: int,
          random_grads: GradSequence) -> Tuple[Dict[str, Tensor], Dict[str, Tensor], Dict[str, Any]]:
    """``(params, grads, state)``: float64 params and state after ``steps`` steps, and the next step's gradients."""
    params = _params(torch.float64, seed=seed)
    grad_sequence = random_grads(params, steps + 1, seed=seed)
    params, state = _run(optimizer, params, grad_sequence[:steps])
    return params, grad_sequence[steps], state


@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_vmap_over_states_at_different_steps(case: Case, random_grads: GradSequence) -> None:
    # Steps 0, 3 and 8: RAdam's branch and NAdam's mu_product differ across the batch.
    optimizer = _make(*case)
    samples = [_warm(optimizer, steps, seed, random_grads) for seed, steps in enumerate((0, 3, 8))]
    batched_params, batched_state = torch.func.vmap(optimizer.step)(*(_stack(list(x)) for x in zip(*samples)))
    assert batched_state["step"].tolist() == [1, 4, 9]
    for i, (params, grads, state) in enumerate(samples):
        expected = optimizer.step(params, grads, state)
        actual = pytree.tree_map(lambda t: t[i], (batched_params, batched_state))  # noqa: B023 (called here)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_func_grad_matches_autograd(case: Case, random_grads: GradSequence) -> None:
    optimizer = _make(*case)
    params, grads, state = _warm(optimizer, RECTIFIED_STEP, 0, random_grads)
    step = state.pop("step")

    def total(params: Dict[str, Tensor], grads: Dict[str, Tensor], buffers: Dict[str, Any]) -> Tensor:
        new_params, new_state = optimizer.step(params, grads, {"step": step, **buffers})
        return sum(t.sum() for t in pytree.tree_leaves((new_params, [new_state[b] for b in optimizer.buffers])))

    expected = torch.autograd.grad(total(*pytree.tree_map(lambda t: t.requires_grad_(), (params, grads, state))),
                                   pytree.tree_leaves((params, grads, state)))
    actual = torch.func.grad(total, argnums=(0, 1, 2))(*pytree.tree_map(Tensor.detach, (params, grads, state)))
    torch.testing.assert_close(pytree.tree_leaves(actual), list(expected), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------- surrogate_loss

SURROGATE_OPTIMIZERS: List[Case] = [
    ("adamw", dict(lr=0.05, betas=(0.5, 0.999), weight_decay=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)),
    ("adamax", dict(lr=0.05, betas=(0.5, 0.999))),
    ("nadam", dict(lr=0.05, betas=(0.5, 0.999), weight_decay=0.1)),
    ("radam", dict(lr=0.05, betas=(0.5, 0.999), decoupled_weight_decay=True, weight_decay=0.1)),
]


@pytest.mark.parametrize("case", SURROGATE_OPTIMIZERS, ids=_case_id)
def test_surrogate_gradient_matches_finite_differences(case: Case, mlp_params: Any, mlp_forward: Any) -> None:
    """K = 3 steps of a small tanh MLP regressing onto ``z @ A``: d surrogate / d(A, MLP params), float64."""
    optimizer = _make(*case)
    theta = mlp_params([3, 4, 1], seed=11)
    gen = torch.Generator().manual_seed(12)
    z, y, a = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(6, 2), (6, 1), (2, 3)])

    def inner(params: Mapping[str, Tensor], a: Tensor) -> Tensor:
        return (mlp_forward(params, z @ a) - y).pow(2).mean()

    surrogate = unroll.surrogate_loss(inner, 3, optimizer=optimizer)
    # Start mid-run so the unroll sees a nontrivial state (RAdam crosses into its rectified branch).
    theta, state = unroll.unrolled_params(inner, 3, optimizer=optimizer)(theta, optimizer.init(theta), a)
    names = list(theta)

    def f(a: Tensor, *flat_theta: Tensor) -> Tensor:
        return surrogate(dict(zip(names, flat_theta)), state, a)

    inputs = tuple(t.detach().clone().requires_grad_() for t in (a, *theta.values()))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
    # The unrolled response is part of it: the gradient differs from that of the plain (K = 0) loss.
    plain = torch.autograd.grad(unroll.surrogate_loss(inner, 0, optimizer=optimizer)(theta, state, inputs[0]),
                                inputs[0])[0]
    assert not torch.allclose(torch.autograd.grad(f(*inputs), inputs[0])[0], plain, atol=1e-6)
    # torch.func.grad through the whole unroll gives the same gradient as autograd.
    torch.testing.assert_close(torch.func.grad(f)(*pytree.tree_map(Tensor.detach, inputs)),
                               torch.autograd.grad(f(*inputs), inputs[0])[0], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ from_torch

FROM_TORCH_CASES = [
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True)),
    (torch.optim.AdamW, dict(lr=0.01)),
    (torch.optim.AdamW, dict(lr=0.01, betas=(0.5, 0.99), weight_decay=0.1, amsgrad=True, maximize=True)),
    (torch.optim.Adagrad, dict(lr=0.05)),
    (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1,
                               maximize=True)),
    (torch.optim.Adamax, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    (torch.optim.NAdam, dict(lr=0.01)),
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, momentum_decay=0.05, decoupled_weight_decay=True,
                             maximize=True)),
    (torch.optim.RAdam, dict(lr=0.01)),
    (torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
]
WARM_STEPS = 4  # RAdam's rectification (step 6) starts during the continued steps


@pytest.mark.parametrize("cls, options", FROM_TORCH_CASES,
                         ids=[f"{cls.__name__}-{_case_id(('', o))}" for cls, o in FROM_TORCH_CASES])
def test_from_torch_continues_mid_training(cls: type, options: Dict[str, Any], random_grads: GradSequence) -> None:
    module = _module(seed=5)
    torch_opt = cls(module.parameters(), **options)
    grad_sequence = random_grads(dict(module.named_parameters()), WARM_STEPS + PARITY_STEPS, seed=5)
    for grads in grad_sequence[:WARM_STEPS]:
        _torch_step(module, torch_opt, grads)
    optimizer, state = unroll.from_torch(torch_opt, module)
    assert optimizer.name == cls.__name__.lower()
    assert all(optimizer.hyperparams[key] == value for key, value in options.items())
    assert int(state["step"]) == WARM_STEPS

    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for step, grads in enumerate(grad_sequence[WARM_STEPS:]):
        params, state = optimizer.step(params, grads, state)
        _torch_step(module, torch_opt, grads)
        worst = _max_abs_diff(module, params)
        assert worst <= PARITY_ATOL, f"continued step {step}: max abs diff {worst:.3g} from torch.optim"
