"""unroll.custom_optimizer and examples/custom_optimizer.py (Lion): exact steps, finite differences in float64,
torch.func.grad and vmap through surrogate_loss, the elementwise flag, and clear errors for a faulty rule."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import Tensor

import unroll
from custom_optimizer import lion, main

MLP_SIZES = [3, 6, 1]


def test_lion_matches_an_in_place_reference(mlp_params: Callable[..., Dict[str, Tensor]],
                                            random_grads: Callable[..., List[Dict[str, Tensor]]]) -> None:
    """The rule as the paper's pseudo-code would run it with in-place torch ops, for 20 steps."""
    lr, beta1, beta2, weight_decay = 0.01, 0.9, 0.99, 0.1
    opt = lion(lr, betas=(beta1, beta2), weight_decay=weight_decay)
    params = mlp_params(MLP_SIZES, seed=0)
    reference = {k: v.clone() for k, v in params.items()}
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    state = opt.init(params)
    for grads in random_grads(params, 20, seed=1):
        params, state = opt.step(params, grads, state)
        for name, p in reference.items():
            update = (momentum[name] * beta1 + grads[name] * (1 - beta1)).sign()
            p.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
            momentum[name].mul_(beta2).add_(grads[name], alpha=1 - beta2)
    torch.testing.assert_close(params, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(state["exp_avg"], momentum, rtol=0, atol=1e-12)
    assert int(state["step"]) == 20


def _validation_after_lion(mlp_forward: Callable[..., Tensor], K: int,
                           data: Tuple[Tensor, ...]) -> Callable[..., Tensor]:
    """``f(lr, weight_decay, params, state)``: validation loss after K Lion steps on the training loss."""
    x, y, x_val, y_val = data

    def train_loss(params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (mlp_forward(params, x) - y).pow(2).mean()

    def f(lr: Tensor, weight_decay: Tensor, params: Dict[str, Tensor], state: Dict[str, Any]) -> Tensor:
        surrogate = unroll.surrogate_loss(train_loss, K, optimizer=lion(lr, weight_decay=weight_decay),
                                          outer_fn=lambda p, x, y: train_loss(p, x_val, y_val))
        return surrogate(params, state, x, y)

    return f


def _data(seed: int) -> Tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x, x_val = (torch.randn(16, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    return x, x.sum(-1, keepdim=True).tanh(), x_val, x_val.sum(-1, keepdim=True).tanh()


def _warm_state(params: Dict[str, Tensor], seed: int) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {"step": torch.tensor(3.0), "exp_avg": {k: 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                                                   for k, v in params.items()}}


def test_surrogate_gradient_matches_finite_differences(mlp_params: Callable[..., Dict[str, Tensor]],
                                                       mlp_forward: Callable[..., Tensor]) -> None:
    """d(validation loss after K=3 Lion steps) / d(lr, weight decay, initial params) in float64."""
    params = mlp_params(MLP_SIZES, seed=2)
    names = list(params)
    f = _validation_after_lion(mlp_forward, 3, _data(3))
    state = _warm_state(params, 4)

    def flat_f(lr: Tensor, weight_decay: Tensor, *flat: Tensor) -> Tensor:
        return f(lr, weight_decay, dict(zip(names, flat)), state)

    inputs = (torch.tensor(0.02, dtype=torch.float64, requires_grad=True),
              torch.tensor(0.1, dtype=torch.float64, requires_grad=True),
              *(p.clone().requires_grad_(True) for p in params.values()))
    assert torch.autograd.gradcheck(flat_f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(flat_f(*inputs), inputs)
    assert all(g.abs().sum() > 0 for g in grads)  # every input really reaches the loss


def test_torch_func_grad_and_vmap_over_seeds(mlp_params: Callable[..., Dict[str, Tensor]],
                                             mlp_forward: Callable[..., Tensor]) -> None:
    """vmap(grad) over three seeds (stacked params, states, data) equals autograd on each seed."""
    f = _validation_after_lion(mlp_forward, 2, _data(5))
    lr, weight_decay = torch.tensor(0.02, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    seeds = [mlp_params(MLP_SIZES, seed=s) for s in (6, 7, 8)]
    states = [_warm_state(p, s) for p, s in zip(seeds, (9, 10, 11))]

    def grad_wrt_lr_and_params(params: Dict[str, Tensor], state: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Tensor]]:
        return torch.func.grad(f, argnums=(0, 2))(lr, weight_decay, params, state)

    stacked = [pytree.tree_map(lambda *xs: torch.stack(xs), *trees) for trees in (seeds, states)]
    batched_lr, batched_params = torch.func.vmap(grad_wrt_lr_and_params)(*stacked)
    for i, (params, state) in enumerate(zip(seeds, states)):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        lr_leaf = lr.clone().requires_grad_(True)
        expected = torch.autograd.grad(f(lr_leaf, weight_decay, leaves, state), [lr_leaf, *leaves.values()])
        func_lr, func_params = grad_wrt_lr_and_params(params, state)
        for got_lr, got_params in ((func_lr, func_params),
                                   (batched_lr[i], {k: v[i] for k, v in batched_params.items()})):
            torch.testing.assert_close(got_lr, expected[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_params, dict(zip(leaves, expected[1:])), rtol=1e-10, atol=1e-12)


def test_example_runs_and_its_hypergradient_is_right() -> None:
    results = main(K=4)
    assert results["hypergradient"] != 0
    assert results["hypergradient"] == pytest.approx(results["finite_difference"], rel=1e-6)


def _normalized_rule(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *,
                     lr: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    # Normalized gradient descent per tensor: the norm looks at the whole tensor, so the rule is not elementwise.
    return param - lr * grad / grad.norm(), {}


@pytest.mark.parametrize("elementwise", [False, True])
def test_elementwise_flag_decides_whether_tensors_are_packed(elementwise: bool,
                                                              mlp_params: Callable[..., Dict[str, Tensor]],
                                                              mlp_forward: Callable[..., Tensor]) -> None:
    opt = unroll.custom_optimizer(_normalized_rule, name="normalized_gd", elementwise=elementwise, lr=0.1)
    params = mlp_params(MLP_SIZES, seed=12)
    x, y, _, _ = _data(13)

    def loss(params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return (mlp_forward(params, x) - y).pow(2).mean()

    unrolled, _ = unroll.unrolled_params(loss, 2, optimizer=opt)(params, opt.init(params), x, y)
    expected, state = dict(params), opt.init(params)
    for _ in range(2):
        grads = torch.func.grad(loss)(expected, x, y)
        expected, state = opt.step(expected, grads, state)  # one tensor at a time: the per-tensor norm
    same = all(torch.allclose(unrolled[k], expected[k], rtol=0, atol=1e-12) for k in params)
    # Declared elementwise, the unroll runs the rule once on all tensors concatenated: one global norm.
    assert same is (not elementwise)


def _rule_returning(result: Callable[[Tensor], Any]) -> Callable[..., Any]:
    return lambda param, grad, buffers, step: result(param)


BAD_RULES = [
    ("not_a_pair", _rule_returning(lambda p: p), TypeError, "must return (new_param, new_buffers)"),
    ("missing_buffer", _rule_returning(lambda p: (p, {})), KeyError, "must return the buffers ['trace'], got []"),
    ("extra_buffer", _rule_returning(lambda p: (p, {"trace": p, "other": p})), KeyError, "got ['other', 'trace']"),
    ("param_shape", _rule_returning(lambda p: (p.sum(), {"trace": p})), ValueError,
     "new parameter has shape () and dtype torch.float64; the parameter has shape (6, 3)"),
    ("buffer_dtype", _rule_returning(lambda p: (p, {"trace": p.float()})), ValueError,
     "buffer 'trace' has shape (6, 3) and dtype torch.float32"),
    ("param_not_tensor", _rule_returning(lambda p: (1.0, {"trace": p})), TypeError, "must be a tensor, got float"),
]


@pytest.mark.parametrize("rule, error, fragment", [c[1:] for c in BAD_RULES], ids=[c[0] for c in BAD_RULES])
def test_a_faulty_rule_is_named(rule: Callable[..., Any], error: type, fragment: str,
                                mlp_params: Callable[..., Dict[str, Tensor]]) -> None:
    opt = unroll.custom_optimizer(rule, name="my_rule", elementwise=False, buffers=("trace",))
    params = mlp_params(MLP_SIZES, seed=0)
    with pytest.raises(error) as info:
        opt.step(params, params, opt.init(params))
    assert "my_rule" in str(info.value) and fragment in str(info.value)


BAD_FACTORY_ARGS = [
    ("rule_not_callable", dict(rule=3, name="x", elementwise=True), TypeError, "rule must be callable"),
    ("no_name", dict(rule=_normalized_rule, name="", elementwise=True), TypeError, "name must be a non-empty str"),
    ("elementwise_not_bool", dict(rule=_normalized_rule, name="x", elementwise=None), TypeError,
     "elementwise must be True or False"),
    ("buffers_as_string", dict(rule=_normalized_rule, name="x", elementwise=True, buffers="exp_avg"), TypeError,
     "sequence of buffer names"),
    ("step_buffer", dict(rule=_normalized_rule, name="x", elementwise=True, buffers=("step",)), ValueError,
     "not 'step'"),
    ("repeated_buffer", dict(rule=_normalized_rule, name="x", elementwise=True, buffers=("m", "m")), ValueError,
     "distinct"),
]


@pytest.mark.parametrize("kwargs, error, fragment", [c[1:] for c in BAD_FACTORY_ARGS],
                         ids=[c[0] for c in BAD_FACTORY_ARGS])
def test_bad_factory_arguments_raise(kwargs: Dict[str, Any], error: type, fragment: str) -> None:
    rule = kwargs.pop("rule")
    with pytest.raises(error) as info:
        unroll.custom_optimizer(rule, **kwargs)
    assert fragment in str(info.value)


def test_elementwise_must_be_stated() -> None:
    with pytest.raises(TypeError, match="elementwise"):
        unroll.custom_optimizer(_normalized_rule, name="normalized_gd", lr=0.1)  # type: ignore[call-arg]
