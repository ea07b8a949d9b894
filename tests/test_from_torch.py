"""unroll.from_torch / unroll.to_torch: continue a torch.optim optimizer exactly in unroll and hand it back, param
groups included; clear errors, before any change, otherwise.

``CASES`` lists the (torch.optim class, options) pairs every round-trip test runs over; a new mirrored class only
needs an entry there."""

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
    (torch.optim.AdamW, dict(lr=0.01, amsgrad=True, maximize=True)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5)),
    (torch.optim.Adamax, dict(lr=0.01, weight_decay=0.1, maximize=True)),
    (torch.optim.NAdam, dict(lr=0.01, momentum_decay=5e-3, weight_decay=0.1)),
    (torch.optim.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    (torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1)),
    (torch.optim.RAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)),
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
    # Identical groups: one plain optimizer.
    assert optimizer.name == "adam" and optimizer.hyperparams == unroll.adam(0.01, amsgrad=True).hyperparams
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


# ------------------------------------------------------------------------------------------- param groups, to_torch

def _two_groups(module: nn.Module, options: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Param groups that differ in learning rate and weight decay from each other and from ``options``."""
    return [{"params": module[0].parameters(), "lr": options["lr"] / 2},
            {"params": module[2].parameters(), "weight_decay": 0.05}]


def _build(case: Tuple[type, Dict[str, Any]], module: nn.Module, groups: bool) -> torch.optim.Optimizer:
    cls, options = case
    return cls(_two_groups(module, options) if groups else module.parameters(), **options)


def _assert_close_torch_state(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Two ``torch_optimizer.state_dict()``: same groups, same entries with the same types, dtypes and devices,
    step counts equal and buffers within PARITY_ATOL (absolute or relative)."""
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys(), index
        for key, value in entry.items():
            ours = actual["state"][index][key]
            assert type(ours) is type(value), (index, key)
            if isinstance(value, Tensor):
                assert (ours.dtype, ours.device, ours.shape) == (value.dtype, value.device, value.shape), (index, key)
                exact = key == "step"  # buffers can reach ~10 (RMSprop's momentum): 1e-6 relative there
                tolerance = 0 if exact else PARITY_ATOL
                torch.testing.assert_close(ours, value, rtol=tolerance, atol=tolerance)


PARAM_GROUP_STEPS = 50


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_param_groups_with_different_hyperparameters_mirror_torch(
        case: Tuple[type, Dict[str, Any]], random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    module = _module()
    torch_opt = _build(case, module, groups=True)
    grad_sequence = random_grads(dict(module.named_parameters()), 3 + PARAM_GROUP_STEPS, seed=4)
    for grads in grad_sequence[:3]:
        _torch_step(module, torch_opt, grads)

    optimizer, state = unroll.from_torch(torch_opt, module)

    assert isinstance(optimizer, unroll.Optimizer) and not optimizer.packable
    for name, member in optimizer.optimizers.items():
        group = torch_opt.param_groups[0 if name.startswith("0.") else 1]
        assert member.hyperparams["lr"] == group["lr"] and member.hyperparams["weight_decay"] == group["weight_decay"]
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for step, grads in enumerate(grad_sequence[3:]):
        params, state = optimizer.step(params, grads, state)
        _torch_step(module, torch_opt, grads)
        worst = _max_abs_diff(module, params)
        assert worst <= PARITY_ATOL, f"step {step}: max abs diff {worst:.3g} from torch.optim"


def _round_trip(case: Tuple[type, Dict[str, Any]], warm_steps: int, unrolled_steps: int, groups: bool,
                grad_sequence: List[Dict[str, Tensor]], device: str = "cpu") -> None:
    """from_torch -> steps of opt.step -> to_torch -> torch.optim steps == torch.optim steps all along."""
    module, reference = _module().to(device), _module().to(device)
    torch_opt, reference_opt = _build(case, module, groups), _build(case, reference, groups)
    grad_sequence = [{name: g.to(device) for name, g in grads.items()} for grads in grad_sequence]
    for grads in grad_sequence[:warm_steps]:
        _torch_step(module, torch_opt, grads)
        _torch_step(reference, reference_opt, grads)

    optimizer, state = unroll.from_torch(torch_opt, module)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for grads in grad_sequence[warm_steps:warm_steps + unrolled_steps]:
        params, state = optimizer.step(params, grads, state)
        _torch_step(reference, reference_opt, grads)
    unroll.to_torch(optimizer, state, torch_opt, module, params=params)

    if warm_steps + unrolled_steps > 0:
        _assert_close_torch_state(torch_opt.state_dict(), reference_opt.state_dict())
    # Written tensors are copies: nothing aliases the unroll's state or params.
    written = [t for s in torch_opt.state.values() for t in s.values() if isinstance(t, Tensor)]
    assert not _storages(written) & _storages(_state_tensors(state) + list(params.values()))
    for step, grads in enumerate(grad_sequence[warm_steps + unrolled_steps:]):
        _torch_step(module, torch_opt, grads)
        _torch_step(reference, reference_opt, grads)
        worst = _max_abs_diff(module, dict(reference.named_parameters()))
        assert worst <= PARITY_ATOL, f"continued step {step}: max abs diff {worst:.3g} from torch.optim"


@pytest.mark.parametrize("groups", [False, True], ids=["one_group", "two_groups"])
@pytest.mark.parametrize("warm_steps, unrolled_steps", [(0, 0), (0, 3), (4, 3)])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_to_torch_round_trip_continues_exactly(case: Tuple[type, Dict[str, Any]], warm_steps: int,
                                              unrolled_steps: int, groups: bool,
                                              random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    grads = random_grads(dict(_module().named_parameters()), warm_steps + unrolled_steps + CONTINUED_STEPS, seed=5)
    _round_trip(case, warm_steps, unrolled_steps, groups, grads)


# torch.optim options that change where and how the state is kept (fused/foreach kernels, capturable steps on the
# device) but not the update; the CUDA cases run where a GPU is present.
IMPLEMENTATION_CASES = [
    ("cpu", (torch.optim.Adam, dict(lr=0.01, amsgrad=True, foreach=True))),
    ("cpu", (torch.optim.Adam, dict(lr=0.01, fused=True))),
    ("cpu", (torch.optim.SGD, dict(lr=0.1, momentum=0.9, fused=True))),
    ("cpu", (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, foreach=True))),
    ("cuda", (torch.optim.Adam, dict(lr=0.01, amsgrad=True))),
    ("cuda", (torch.optim.Adam, dict(lr=0.01, capturable=True))),
    ("cuda", (torch.optim.Adam, dict(lr=0.01, fused=True))),
    ("cuda", (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))),
    ("cuda", (torch.optim.RMSprop, dict(lr=0.01, momentum=0.9, centered=True, capturable=True))),
]


@pytest.mark.parametrize("device, case", IMPLEMENTATION_CASES,
                         ids=[f"{d}-{_case_id(c)}" for d, c in IMPLEMENTATION_CASES])
def test_to_torch_round_trip_under_implementation_options(device: str, case: Tuple[type, Dict[str, Any]],
                                                          random_grads: Callable[..., List[Dict[str, Tensor]]]
                                                          ) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    grads = random_grads(dict(_module().named_parameters()), 2 + 3 + CONTINUED_STEPS, seed=8)
    _round_trip(case, 2, 3, True, grads, device)


def test_to_torch_leaves_module_parameters_alone_unless_given(
        random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    module = _module()
    torch_opt = torch.optim.Adam(module.parameters(), lr=0.01)
    optimizer, state = unroll.from_torch(torch_opt, module)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for grads in random_grads(params, 2, seed=6):
        params, state = optimizer.step(params, grads, state)
    before = copy.deepcopy(module.state_dict())

    unroll.to_torch(optimizer, state, torch_opt, module)
    _assert_same(module.state_dict(), before)
    assert all(int(s["step"]) == 2 for s in torch_opt.state.values())

    unroll.to_torch(optimizer, state, torch_opt, module, params=params)
    _assert_same(dict(module.named_parameters()), params)
    assert all(p.requires_grad and p.grad_fn is None for p in module.parameters())


def test_to_torch_of_a_step_zero_state_removes_sgd_momentum(
        random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    """SGD keeps no step count: before its first step a parameter has no momentum buffer at all."""
    module, reference = _module(), _module()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    grad_sequence = random_grads(dict(module.named_parameters()), 4, seed=7)
    for grads in grad_sequence[:2]:
        _torch_step(module, torch_opt, grads)
    optimizer, _ = unroll.from_torch(torch_opt, module)

    unroll.to_torch(optimizer, optimizer.init(dict(module.named_parameters())), torch_opt, module,
                    params=dict(reference.named_parameters()))

    _assert_same(torch_opt.state_dict(), reference_opt.state_dict())  # as a fresh torch.optim.SGD: no state
    for grads in grad_sequence[2:]:
        _torch_step(module, torch_opt, grads)
        _torch_step(reference, reference_opt, grads)
    _assert_same(dict(module.named_parameters()), dict(reference.named_parameters()))


def test_to_torch_accepts_a_tensor_hyperparameter_of_the_groups_value() -> None:
    """The meta-learning hand-off: an optimizer built with a learned (tensor) lr, once the group holds its value."""
    module = _module()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    params = {name: p.detach() for name, p in module.named_parameters()}
    learned = torch.tensor(0.375, requires_grad=True)  # exactly representable in float32
    optimizer = unroll.sgd(learned, momentum=0.9)
    with pytest.raises(ValueError, match=r"lr: tensor\(0.3750.*here, 0.1 in torch"):
        unroll.to_torch(optimizer, optimizer.init(params), torch_opt, module)
    torch_opt.param_groups[0]["lr"] = learned.item()
    unroll.to_torch(optimizer, optimizer.init(params), torch_opt, module)


def _round_trip_setup() -> Tuple[nn.Module, torch.optim.Optimizer, unroll.Optimizer, Dict[str, Any], Dict[str, Tensor]]:
    """Adam in two groups with equal hyperparameters, 2 torch steps, then 2 unrolled steps: a valid to_torch call."""
    module = _module()
    torch_opt = torch.optim.Adam([{"params": module[0].parameters()}, {"params": module[2].parameters()}], lr=0.01)
    all_ones = {name: torch.ones_like(p) for name, p in module.named_parameters()}
    for _ in range(2):
        _torch_step(module, torch_opt, all_ones)
    optimizer, state = unroll.from_torch(torch_opt, module)
    params = {name: p.detach().clone() for name, p in module.named_parameters()}
    for _ in range(2):
        params, state = optimizer.step(params, all_ones, state)
    return module, torch_opt, optimizer, state, params


def _other_module_and_adam(*_: Any) -> Tuple[Any, ...]:
    module = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return torch.optim.Adam(module.parameters(), lr=0.01), module


def _drop(mapping: Mapping[str, Any], key: str) -> Dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


# Each case turns the valid call (optimizer, state, torch_opt, module, params) into a wrong one.
TO_TORCH_ERRORS = [
    ("not_an_optimizer", lambda o, s, t, m, p: ("adam", s, t, m, p), TypeError, "must be an unroll optimizer"),
    ("unsupported_class", lambda o, s, t, m, p: (o, s, torch.optim.Rprop(m.parameters()), m, p), TypeError,
     "got torch.optim.rprop.Rprop"),
    ("other_class", lambda o, s, t, m, p: (o, s, torch.optim.SGD(m.parameters(), lr=0.01), m, p), TypeError,
     "stepped by unroll.adam, but torch_optimizer is a torch.optim.SGD"),
    ("other_lr", lambda o, s, t, m, p: (unroll.adam(0.02), s, t, m, p), ValueError, "lr: 0.02 here, 0.01 in torch"),
    ("other_group", lambda o, s, t, m, p: (t.param_groups[1].update(betas=(0.5, 0.999)) or o, s, t, m, p),
     ValueError, "param group 1"),
    ("other_module", lambda o, s, t, m, p: (o, s, *_other_module_and_adam(), None), ValueError,
     "has shape (4, 3) but the parameter has shape (5, 3)"),
    ("foreign_module", lambda o, s, t, m, p: (o, s, t, _module(), p), ValueError, "not a parameter of the given"),
    ("missing_buffer", lambda o, s, t, m, p: (o, _drop(s, "exp_avg_sq"), t, m, p), KeyError, "missing ['exp_avg_sq']"),
    ("missing_name", lambda o, s, t, m, p: (o, {**s, "exp_avg": _drop(s["exp_avg"], "2.bias")}, t, m, p), KeyError,
     "missing ['2.bias']"),
    ("stacked_step", lambda o, s, t, m, p: (o, {**s, "step": torch.stack([s["step"]] * 3)}, t, m, p), ValueError,
     "0-dim"),
    ("fractional_step", lambda o, s, t, m, p: (o, {**s, "step": s["step"] + 0.5}, t, m, p), ValueError,
     "whole number"),
    ("params_shape", lambda o, s, t, m, p: (o, s, t, m, {**p, "2.bias": torch.zeros(3)}), ValueError,
     "params['2.bias'] has shape (3,)"),
    ("params_names", lambda o, s, t, m, p: (o, s, t, m, _drop(p, "0.bias")), KeyError, "missing ['0.bias']"),
]


@pytest.mark.parametrize("make_call, error, fragment", [c[1:] for c in TO_TORCH_ERRORS],
                         ids=[c[0] for c in TO_TORCH_ERRORS])
def test_to_torch_refuses_mismatches_before_changing_anything(make_call: Callable[..., Tuple[Any, ...]],
                                                              error: type, fragment: str) -> None:
    module, torch_opt, optimizer, state, params = _round_trip_setup()
    optimizer, state, torch_opt, module, params = make_call(optimizer, state, torch_opt, module, params)
    before = _snapshot(module, torch_opt) if isinstance(torch_opt, torch.optim.Adam) else None
    with pytest.raises(error) as info:
        unroll.to_torch(optimizer, state, torch_opt, module, params=params)
    assert fragment in str(info.value)
    if before is not None:
        _assert_same(_snapshot(module, torch_opt), before)


