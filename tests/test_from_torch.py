"""unroll.from_torch: continue a torch.optim SGD/Adam/RMSprop exactly, without touching it; clear errors otherwise."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Mapping, Tuple

import pytest
import torch
from torch import Tensor, nn

import unroll

PARITY_ATOL = 1e-6
CONTINUED_STEPS = 10

CASES = [
    (torch.optim.SGD, dict(lr=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True)),
    (torch.optim.Adam, dict(lr=0.01)),
    (torch.optim.Adam, dict(lr=0.01, betas=(0.5, 0.99), eps=1e-6, amsgrad=True, weight_decay=0.1, maximize=True)),
    (torch.optim.RMSprop, dict(lr=0.01)),
    (torch.optim.RMSprop, dict(lr=0.01, alpha=0.9, momentum=0.9, centered=True, weight_decay=0.1, maximize=True)),
]


def _case_id(case: Tuple[type, Dict[str, Any]]) -> str:
    cls, options = case
    return cls.__name__ + "-" + "-".join(f"{k}={v}" for k, v in options.items())


def _module(seed: int = 0) -> nn.Module:
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


def _torch_step(module: nn.Module, torch_opt: torch.optim.Optimizer, grads: Mapping[str, Tensor | None]) -> None:
    for name, p in module.named_parameters():
        g = grads.get(name)
        p.grad = None if g is None else g.clone()
    torch_opt.step()


def _snapshot(module: nn.Module, torch_opt: torch.optim.Optimizer) -> Any:
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}
    return copy.deepcopy((module.state_dict(), grads, torch_opt.state_dict()))


def _assert_same(actual: Any, expected: Any) -> None:
    """Bit-identical nested containers of tensors and plain values."""
    if isinstance(expected, Tensor):
        assert isinstance(actual, Tensor) and actual.dtype == expected.dtype and torch.equal(actual, expected)
    elif isinstance(expected, Mapping):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
    else:
        assert actual == expected


def _storages(tensors: Iterable[Any]) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, Tensor)}


def _state_tensors(state: Mapping[str, Any]) -> List[Tensor]:
    return [state["step"]] + [t for key, value in state.items() if key != "step" for t in value.values()]


def _max_abs_diff(module: nn.Module, params: Mapping[str, Tensor]) -> float:
    return max((params[name] - p).abs().max().item() for name, p in module.named_parameters())


@pytest.mark.parametrize("warm_steps", [0, 4])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_continues_torch_optimizer_exactly(case: Tuple[type, Dict[str, Any]], warm_steps: int,
                                          random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    cls, options = case
    module = _module()
    torch_opt = cls(module.parameters(), **options)
    grad_sequence = random_grads(dict(module.named_parameters()), warm_steps + CONTINUED_STEPS, seed=1)
    for grads in grad_sequence[:warm_steps]:
        _torch_step(module, torch_opt, grads)
    before = _snapshot(module, torch_opt)

    optimizer, state = unroll.from_torch(torch_opt, module)

    _assert_same(_snapshot(module, torch_opt), before)
    for key, value in options.items():
        assert optimizer.hyperparams[key] == value, key
    if cls is not torch.optim.SGD:
        assert int(state["step"]) == warm_steps
    # The returned state is a copy: nothing aliases torch.optim's buffers or the module's parameters.
    torch_tensors = [t for s in torch_opt.state.values() for t in s.values()] + list(module.parameters())
    assert not _storages(_state_tensors(state)) & _storages(torch_tensors)

    # Unroll from the module's live parameters, then check nothing was touched.
    params: Dict[str, Tensor] = dict(module.named_parameters())
    trajectory = []
    for grads in grad_sequence[warm_steps:]:
        params, state = optimizer.step(params, grads, state)
        trajectory.append(params)
    _assert_same(_snapshot(module, torch_opt), before)

    for step, (grads, ours) in enumerate(zip(grad_sequence[warm_steps:], trajectory)):
        _torch_step(module, torch_opt, grads)
        worst = _max_abs_diff(module, ours)
        assert worst <= PARITY_ATOL, f"continued step {step}: max abs diff {worst:.3g} from torch.optim"


def test_param_groups_with_equal_hyperparameters_in_any_order(
        random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    module = _module()
    groups = [{"params": module[2].parameters()}, {"params": module[0].parameters()}]  # not module order
    torch_opt = torch.optim.Adam(groups, lr=0.01, amsgrad=True)
    grad_sequence = random_grads(dict(module.named_parameters()), 3 + CONTINUED_STEPS, seed=2)
    for grads in grad_sequence[:3]:
        _torch_step(module, torch_opt, grads)
    optimizer, state = unroll.from_torch(torch_opt, module)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert set(state["exp_avg"]) == set(params)
    for grads in grad_sequence[3:]:
        params, state = optimizer.step(params, grads, state)
        _torch_step(module, torch_opt, grads)
        assert _max_abs_diff(module, params) <= PARITY_ATOL


def test_uses_the_current_scheduled_learning_rate(random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    module = _module()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.5)
    grad_sequence = random_grads(dict(module.named_parameters()), 4, seed=3)
    for grads in grad_sequence[:2]:
        _torch_step(module, torch_opt, grads)
        scheduler.step()
    optimizer, state = unroll.from_torch(torch_opt, module)
    assert optimizer.hyperparams["lr"] == pytest.approx(0.025)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for grads in grad_sequence[2:]:
        params, state = optimizer.step(params, grads, state)
        _torch_step(module, torch_opt, grads)
    assert _max_abs_diff(module, params) <= PARITY_ATOL


# ---------------------------------------------------------------------------------------------------------- errors

def _two_groups_different_lr(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"params": module[0].parameters()}, {"params": module[2].parameters(), "lr": 0.1}],
                            lr=0.01)


def _holds_foreign_param(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(module.parameters()) + [nn.Parameter(torch.zeros(5, 7))], lr=0.1)


def _misses_module_params(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(module[0].parameters())


def _different_step_counts(cls: type, full_steps: int, **options: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """One step on which the first parameter had no gradient, then ``full_steps`` steps with all gradients."""
    def build(module: nn.Module) -> torch.optim.Optimizer:
        torch_opt = cls(module.parameters(), **options)
        all_grads = {name: torch.ones_like(p) for name, p in module.named_parameters()}
        _torch_step(module, torch_opt, {name: g for name, g in list(all_grads.items())[1:]})
        for _ in range(full_steps):
            _torch_step(module, torch_opt, all_grads)
        return torch_opt
    return build


ERROR_CASES = [
    ("adadelta", lambda m: torch.optim.Adadelta(m.parameters()), TypeError, "Adadelta"),
    ("rprop", lambda m: torch.optim.Rprop(m.parameters()), TypeError, "Rprop"),
    ("group_lr", _two_groups_different_lr, ValueError, "['lr']"),
    ("foreign_param", _holds_foreign_param, ValueError, "(5, 7) that is not a parameter of the given module"),
    ("missing_params", _misses_module_params, ValueError, "['2.bias', '2.weight'] are not held by the optimizer"),
    ("adam_steps", _different_step_counts(torch.optim.Adam, 1), ValueError, "different step counts [1, 2]"),
    ("rmsprop_steps", _different_step_counts(torch.optim.RMSprop, 2), ValueError, "different step counts [2, 3]"),
    # SGD keeps no step count, but a missing momentum buffer after a step means that parameter is behind.
    ("sgd_momentum", _different_step_counts(torch.optim.SGD, 0, lr=0.1, momentum=0.9), ValueError,
     "different step counts [0, 1]"),
]


@pytest.mark.parametrize("build, error, fragment", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_unrepresentable_optimizers_raise(build: Callable[[nn.Module], torch.optim.Optimizer], error: type,
                                          fragment: str) -> None:
    module = _module()
    torch_opt = build(module)
    before = _snapshot(module, torch_opt)
    with pytest.raises(error) as info:
        unroll.from_torch(torch_opt, module)
    assert fragment in str(info.value)
    _assert_same(_snapshot(module, torch_opt), before)


def test_module_must_be_a_module() -> None:
    module = _module()
    with pytest.raises(TypeError, match="nn.Module"):
        unroll.from_torch(torch.optim.SGD(module.parameters(), lr=0.1), dict(module.named_parameters()))
