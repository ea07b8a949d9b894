"""unroll.param_groups: each parameter stepped by its own optimizer, usable wherever an unroll.Optimizer is.

Parity with torch.optim's param groups (50 steps) and the round trip with to_torch are in test_from_torch.py.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, Callable, Dict, List, Mapping, Tuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor

import unroll

MLP_SIZES = [3, 5, 1]  # params w0 (5, 3), b0 (5,), w1 (1, 5), b1 (1,)


def _groups(lr0: Any = 0.05) -> Dict[str, unroll.Optimizer]:
    """Adam (learning rate ``lr0``) on the first layer, SGD with momentum on the weight and plain SGD on the bias
    of the second: three members, buffers that only some parameters have."""
    first = unroll.adam(lr0, betas=(0.5, 0.9))
    return {"w0": first, "b0": first, "w1": unroll.sgd(0.1, momentum=0.9), "b1": unroll.sgd(0.2)}


def _data(seed: int) -> Tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x, x_val = torch.randn(16, 3, generator=gen, dtype=torch.float64), torch.randn(16, 3, generator=gen,
                                                                                  dtype=torch.float64)
    target = lambda x: torch.sin(x.sum(-1, keepdim=True))  # noqa: E731
    return x, target(x), x_val, target(x_val)


def _tree_equal(a: Any, b: Any) -> bool:
    (leaves_a, spec_a), (leaves_b, spec_b) = pytree.tree_flatten(a), pytree.tree_flatten(b)
    return spec_a == spec_b and all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))


def test_each_parameter_takes_its_own_optimizers_step(mlp_params: Callable[..., Dict[str, Tensor]],
                                                     random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    params = mlp_params(MLP_SIZES, seed=0)
    groups = _groups()
    opt = unroll.param_groups(groups)
    assert isinstance(opt, unroll.Optimizer) and not opt.packable
    state = opt.init(params)
    # Each buffer dict holds exactly the parameters whose optimizer has that buffer.
    assert state.keys() == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}
    assert list(state["exp_avg"]) == ["w0", "b0"] and list(state["momentum_buffer"]) == ["w1"]

    member_states = {name: member.init({name: params[name]}) for name, member in groups.items()}
    expected = dict(params)
    for grads in random_grads(params, 4, seed=1):
        params, state = opt.step(params, grads, state)
        for name, member in groups.items():
            new, member_states[name] = member.step({name: expected[name]}, {name: grads[name]}, member_states[name])
            expected[name] = new[name]
        assert list(params) == list(expected)
        for name in params:
            assert torch.equal(params[name], expected[name]), name
            for buffer in groups[name].buffers:
                assert torch.equal(state[buffer][name], member_states[name][buffer][name]), (name, buffer)
    assert int(state["step"]) == 4


def test_a_function_of_the_name_equals_the_mapping(mlp_params: Callable[..., Dict[str, Tensor]],
                                                   random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    params = mlp_params(MLP_SIZES, seed=2)
    grads = random_grads(params, 1, seed=3)[0]
    groups = _groups()
    by_name = unroll.param_groups(lambda name: groups[name], names=params)
    assert by_name.optimizers == groups
    by_mapping = unroll.param_groups(groups)
    results = [opt.step(params, grads, opt.init(params)) for opt in (by_name, by_mapping)]
    assert _tree_equal(results[0], results[1])


def test_is_copyable_and_picklable(mlp_params: Callable[..., Dict[str, Tensor]]) -> None:
    params = mlp_params(MLP_SIZES, seed=0)
    opt = unroll.param_groups(_groups())
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.optimizers.keys() == opt.optimizers.keys() and twin.buffers == opt.buffers
        assert _tree_equal(twin.init(params), opt.init(params))


def _surrogate(mlp_forward: Callable[..., Tensor], lr0: Any, K: int) -> Callable[..., Tensor]:
    """Validation loss after K param-group steps on the training loss: a function of (params, state, data)."""
    def train_loss(params: Mapping[str, Tensor], x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> Tensor:
        return (mlp_forward(params, x) - y).pow(2).mean()

    def val_loss(params: Mapping[str, Tensor], x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor) -> Tensor:
        return (mlp_forward(params, x_val) - y_val).pow(2).mean()

    return unroll.surrogate_loss(train_loss, K, optimizer=unroll.param_groups(_groups(lr0)), outer_fn=val_loss)


def test_surrogate_gradient_matches_finite_differences(mlp_params: Callable[..., Dict[str, Tensor]],
                                                       mlp_forward: Callable[..., Tensor]) -> None:
    """d(validation loss after K=3 steps) / d(initial params, the first group's learning rate), float64."""
    params = mlp_params(MLP_SIZES, seed=4)
    names = list(params)
    data = _data(5)
    state = unroll.param_groups(_groups()).init(params)

    def f(lr0: Tensor, *flat: Tensor) -> Tensor:
        return _surrogate(mlp_forward, lr0, K=3)(dict(zip(names, flat)), state, *data)

    inputs = (torch.tensor(0.05, dtype=torch.float64, requires_grad=True),
              *(p.clone().requires_grad_(True) for p in params.values()))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    d_lr, *d_params = torch.autograd.grad(f(*inputs), inputs)
    assert d_lr.abs() > 0 and all(d.abs().sum() > 0 for d in d_params)  # not vacuous


def test_torch_func_grad_and_vmap_over_seeds(mlp_params: Callable[..., Dict[str, Tensor]],
                                             mlp_forward: Callable[..., Tensor]) -> None:
    """vmap(grad(surrogate)) over three seeds' stacked params, states and data equals each seed on its own."""
    K, seeds = 2, (6, 7, 8)
    opt = unroll.param_groups(_groups())
    lr0 = torch.tensor(0.05, dtype=torch.float64)

    def value_of(lr: Tensor, params: Dict[str, Tensor], state: Dict[str, Any], *data: Tensor) -> Tensor:
        return _surrogate(mlp_forward, lr, K)(params, state, *data)

    per_seed = []
    for seed in seeds:
        params = mlp_params(MLP_SIZES, seed=seed)
        state = opt.init(params)
        # Warm states, so the batched step counts and buffers are not all zeros.
        state = {**state, "step": state["step"] + seed}
        per_seed.append((params, state, _data(seed)))
    stacked = pytree.tree_map(lambda *xs: torch.stack(xs), *per_seed)

    grads = torch.func.vmap(torch.func.grad(value_of), in_dims=(None, 0, 0, 0, 0, 0, 0))(lr0, stacked[0], stacked[1],
                                                                                *stacked[2])
    for i, (params, state, data) in enumerate(per_seed):
        lr = lr0.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(value_of(lr, params, state, *data), lr)
        assert torch.func.grad(value_of)(lr0, params, state, *data) == pytest.approx(expected.item(), rel=1e-12)
        assert grads[i].item() == pytest.approx(expected.item(), rel=1e-12)


def _named(mlp_params: Callable[..., Dict[str, Tensor]]) -> Dict[str, Tensor]:
    return mlp_params(MLP_SIZES, seed=0)


BAD_GROUPS = [
    ("not_a_mapping", lambda: unroll.param_groups([unroll.sgd(0.1)]), TypeError, "mapping"),
    ("empty", lambda: unroll.param_groups({}), ValueError, "empty"),
    ("member_not_optimizer", lambda: unroll.param_groups({"w0": torch.optim.SGD}), TypeError,
     "param_groups['w0'] must be an unroll optimizer"),
    ("nested", lambda: unroll.param_groups({"w0": unroll.param_groups({"w0": unroll.sgd(0.1)})}), TypeError,
     "is itself a param_groups"),
    ("function_without_names", lambda: unroll.param_groups(lambda name: unroll.sgd(0.1)), TypeError, "names="),
    ("names_as_string", lambda: unroll.param_groups(lambda name: unroll.sgd(0.1), names="w0"), TypeError,
     "iterable of parameter names"),
    ("names_with_mapping", lambda: unroll.param_groups({"w0": unroll.sgd(0.1)}, names=["w0"]), TypeError,
     "only for a function"),
]


@pytest.mark.parametrize("build, error, fragment", [c[1:] for c in BAD_GROUPS], ids=[c[0] for c in BAD_GROUPS])
def test_bad_groups_raise_clear_errors(build: Callable[[], Any], error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        build()
    assert fragment in str(info.value)


def test_names_must_match_the_params_exactly(mlp_params: Callable[..., Dict[str, Tensor]]) -> None:
    params = _named(mlp_params)
    groups = _groups()
    missing_bias = unroll.param_groups({k: v for k, v in groups.items() if k != "b1"})
    with pytest.raises(KeyError, match=r"no optimizer for the params \['b1'\]"):
        missing_bias.init(params)
    misspelt = unroll.param_groups({**groups, "w2": unroll.sgd(0.1)})
    with pytest.raises(KeyError, match=r"optimizers for \['w2'\], which are not in params"):
        misspelt.init(params)
    opt = unroll.param_groups(groups)
    state = opt.init(params)
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    with pytest.raises(KeyError, match=r"optimizers for \['b1'\], which are not in params"):
        opt.step({k: v for k, v in params.items() if k != "b1"}, grads, state)
    # surrogate_loss checks the state once, before unrolling.
    surrogate = unroll.surrogate_loss(lambda p: sum(v.sum() for v in p.values()), 2, optimizer=missing_bias)
    with pytest.raises(KeyError, match=r"no optimizer for the params \['b1'\]"):
        surrogate(params, state)


def test_state_of_another_grouping_is_refused(mlp_params: Callable[..., Dict[str, Tensor]]) -> None:
    params = _named(mlp_params)
    opt = unroll.param_groups(_groups())
    all_adam = unroll.param_groups({name: unroll.adam(0.1) for name in params})
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    with pytest.raises(KeyError, match=r"state entries: missing \['momentum_buffer'\]"):
        opt.step(params, grads, all_adam.init(params))
    state = opt.init(params)
    state["momentum_buffer"] = {"w1": state["momentum_buffer"]["w1"], "b1": torch.zeros(1, dtype=torch.float64)}
    with pytest.raises(KeyError, match=r"state\['momentum_buffer'\] keys do not match the params whose optimizer "
                                       r"has 'momentum_buffer': unexpected \['b1'\]"):
        opt.step(params, grads, state)
    state = opt.init(params)
    state["exp_avg"] = {**state["exp_avg"], "b0": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"state\['exp_avg'\]\['b0'\] has shape \(2,\)"):
        opt.step(params, grads, state)


def test_param_groups_is_a_sibling_of_the_per_tensor_optimizer() -> None:
    """Both kinds follow the one protocol (``unroll.Optimizer``); only the per-tensor kind has an ``update``."""
    from unroll.optimizer import TensorOptimizer
    opt = unroll.param_groups({"w": unroll.sgd(0.1), "b": unroll.nadam(1e-3)})
    assert isinstance(opt, unroll.Optimizer) and not isinstance(opt, TensorOptimizer)
    assert not hasattr(opt, "update")
    assert opt.buffers == ("exp_avg", "exp_avg_sq", "mu_product") and opt.scalar_buffers == ("mu_product",)
    assert not opt.packable and opt.hyperparams is opt.optimizers
    direct = unroll.Optimizer("mine", {}, (), lambda p, g, b, s: (p - g, {}))
    assert type(direct) is TensorOptimizer and isinstance(unroll.sgd(0.1), TensorOptimizer)
