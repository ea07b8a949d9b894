"""The two ways the unroll takes each inner gradient: plain autograd, and torch.func.grad under torch.func transforms.

Outside transforms ``_trajectory`` uses ``torch.autograd.grad`` (less overhead) and records the gradient's graph
only when a backward pass can use it; under ``torch.func.grad``/``vmap`` it must use ``torch.func.grad``. Both
must give the same numbers and the same "constant" semantics of ``stop_grad``.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

import unroll
from unroll._engine import under_torch_func

K = 3


def _params() -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
            "b": torch.randn(3, generator=gen, dtype=torch.float64)}


def _x() -> Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loss(params: Dict[str, Tensor], x: Tensor) -> Tensor:
    return torch.tanh(x @ params["w"] + params["b"]).pow(2).mean()


def test_detects_torch_func_transforms() -> None:
    assert not under_torch_func()
    seen = []
    torch.func.vmap(lambda t: seen.append(under_torch_func()) or t)(torch.ones(2))
    torch.func.grad(lambda t: seen.append(under_torch_func()) or t.sum())(torch.ones(2))
    assert seen == [True, True]


def test_plain_and_transform_paths_give_the_same_unrolled_params_and_gradient() -> None:
    opt = unroll.adam(0.1)
    params = _params()
    run = unroll.unrolled_params(_loss, K, optimizer=opt)

    def f(x: Tensor) -> Tensor:
        params_k, _ = run(params, opt.init(params), x)
        return sum(p.pow(2).sum() for p in params_k.values())

    x = _x().requires_grad_()
    plain_value = f(x)
    (plain_grad,) = torch.autograd.grad(plain_value, x)
    func_grad, func_value = torch.func.grad_and_value(f)(_x())
    torch.testing.assert_close(func_value, plain_value.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(func_grad, plain_grad, rtol=1e-10, atol=1e-14)


def test_no_graph_under_no_grad_and_same_values() -> None:
    opt = unroll.adam(0.1)
    params = {n: p.requires_grad_() for n, p in _params().items()}
    run = unroll.unrolled_params(_loss, K, optimizer=opt)
    with_graph, _ = run(params, opt.init(params), _x())
    with torch.no_grad():
        without, state = run(params, opt.init(params), _x())
    assert all(not p.requires_grad for p in without.values())
    assert all(not t.requires_grad for t in state["exp_avg"].values())
    for name in params:
        assert torch.equal(without[name], with_graph[name].detach())


def test_stop_grad_result_is_constant_in_both_paths() -> None:
    # inner_fn closes over a tensor that requires grad; with stop_grad the unrolled params must not depend on it.
    opt = unroll.sgd(0.1)
    params = _params()

    def unrolled_sum(scale: Tensor) -> Tensor:
        run = unroll.unrolled_params(lambda p, x: _loss(p, x * scale), K, stop_grad=True, optimizer=opt)
        params_k, _ = run(params, opt.init(params), _x())
        return sum(p.sum() for p in params_k.values())

    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert not unrolled_sum(scale).requires_grad
    assert float(torch.func.grad(unrolled_sum)(scale.detach())) == 0.0


def test_loss_that_ignores_the_params_gives_zero_gradients_in_both_paths() -> None:
    opt = unroll.sgd(0.1)
    params = _params()
    run = unroll.unrolled_params(lambda p, x: x.pow(2).sum(), K, optimizer=opt)
    plain, _ = run(params, opt.init(params), _x())
    under_vmap, _ = torch.func.vmap(lambda x: run(params, opt.init(params), x))(_x()[None])
    for name, p in params.items():
        assert torch.equal(plain[name], p)
        assert torch.equal(under_vmap[name][0], p)


def test_inference_mode_gives_the_same_unrolled_params() -> None:
    # autograd records nothing under inference_mode; the unroll must still take real gradient steps there.
    opt = unroll.adam(0.1)
    params = _params()
    run = unroll.unrolled_params(_loss, K, optimizer=opt)
    expected, _ = run(params, opt.init(params), _x())
    checkpointed = unroll.unrolled_params(_loss, K, optimizer=opt, checkpoint=True)
    with torch.inference_mode():
        results = [f(params, opt.init(params), _x())[0] for f in (run, checkpointed)]
    for params_k in results:
        for name in params:
            assert not torch.equal(expected[name], params[name])
            torch.testing.assert_close(params_k[name], expected[name], rtol=1e-12, atol=0)
