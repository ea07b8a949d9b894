"""The library refuses, early and by name, what a user gets wrong (issue 24, item 4): a module's own buffers changed
by an unroll, the committed step's buffers lost, dtype and device mismatches, a surrogate with nothing to
differentiate, wrong step indices and step counts, malformed ``betas``."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll


def _models(seed: int = 0) -> Tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), nn.Linear(3, 2)


def _batch() -> Tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, generator=gen), torch.randn(8, 3, generator=gen)


def _d_loss(D: nn.Module) -> Callable[..., Tensor]:
    def loss(p: Dict[str, Tensor], real: Tensor, fake: Tensor) -> Tensor:
        return functional_call(D, p, (fake,)).mean() - functional_call(D, p, (real,)).mean()
    return loss


def _constants(module: nn.Module) -> Dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _snapshot(module: nn.Module) -> Dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _assert_same(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------------ 1. the module's own buffers stay its own

ENTRIES: Dict[str, Callable[..., Any]] = {
    "surrogate_loss": lambda loss, opt: unroll.surrogate_loss(loss, 3, optimizer=opt),
    "surrogate_loss_K0": lambda loss, opt: unroll.surrogate_loss(loss, 0, optimizer=opt),  # outer_fn's call
    "surrogate_loss_checkpoint": lambda loss, opt: unroll.surrogate_loss(loss, 3, optimizer=opt, checkpoint=True),
    "unrolled_params": lambda loss, opt: unroll.unrolled_params(loss, 3, optimizer=opt),
    "train_step": lambda loss, opt: unroll.train_step(loss, optimizer=opt),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_buffers_missing_from_the_mapping_are_restored_and_refused(entry: str) -> None:
    D, G = _models()
    D.train()
    real, z = _batch()
    opt = unroll.adam(0.01)
    params = _constants(D)
    before = _snapshot(D)
    run = ENTRIES[entry](_d_loss(D), opt)
    with pytest.raises(RuntimeError, match=r"buffers \['1.running_mean', '1.running_var', "
                                           r"'1.num_batches_tracked'\].*buffers=dict\(module.named_buffers\(\)\)"
                                           r".*strict=True"):
        run(params, opt.init(params), real, G(z))
    _assert_same(_snapshot(D), before)  # num_batches_tracked still 0, statistics untouched

    # Passing the buffers is the documented way: they are updated in copies, the module is left alone.
    run(params, opt.init(params), real, G(z), buffers=dict(D.named_buffers()))
    _assert_same(_snapshot(D), before)


def test_buffers_only_read_or_of_other_modules_are_accepted() -> None:
    D, G = _models()
    real, z = _batch()
    opt = unroll.sgd(0.1)
    params = _constants(D)
    # Eval mode reads the running statistics without changing them: nothing to refuse.
    D.eval()
    before = _snapshot(D)
    unroll.surrogate_loss(_d_loss(D), 2, optimizer=opt)(params, opt.init(params), real, G(z))
    _assert_same(_snapshot(D), before)
    # A module that the mapping has no tensor of (here a generator with BatchNorm, run by the closure) is the
    # caller's business, not the inner player's.
    D.train()
    G_bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))

    def loss(p: Dict[str, Tensor], real: Tensor) -> Tensor:
        return functional_call(D, p, (G_bn(z),)).mean() - functional_call(D, p, (real,)).mean()

    unroll.surrogate_loss(loss, 2, optimizer=opt)(params, opt.init(params), real, buffers=dict(D.named_buffers()))
    assert int(G_bn[1].num_batches_tracked) == 3  # two unrolled steps and the outer loss


# -------------------------------------------------------------------------- 2. the committed step's buffers

def test_train_step_returns_the_committed_steps_buffers() -> None:
    D, G = _models()
    D.train()
    real, z = _batch()
    fake = G(z).detach()
    opt = unroll.adam(0.01)
    params, buffers = _constants(D), {n: b.clone() for n, b in D.named_buffers()}
    new_params, new_state, loss, new_buffers = unroll.train_step(_d_loss(D), optimizer=opt, return_buffers=True)(
        params, opt.init(params), real, fake, buffers=buffers)
    # The same as the module's own update, which the committed step made in its copy.
    _d_loss(D)(dict(D.named_parameters()), real, fake)
    _assert_same(new_buffers, dict(D.named_buffers()))
    assert int(new_buffers["1.num_batches_tracked"]) == 2 and int(buffers["1.num_batches_tracked"]) == 0
    # Without the flag the result is unchanged: three values, the same numbers.
    plain = unroll.train_step(_d_loss(D), optimizer=opt)(params, opt.init(params), real, fake, buffers=buffers)
    assert len(plain) == 3
    _assert_same(plain[0], new_params)
    assert torch.equal(plain[2], loss)
    no_buffers = unroll.train_step(lambda p, x: (x @ p["w"]).sum(), optimizer=opt, return_buffers=True)
    assert no_buffers({"w": torch.ones(2)}, opt.init({"w": torch.ones(2)}), real)[3] == {}


# ----------------------------------------------------------------------------- 3. dtypes and devices

class _Counting:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, p: Dict[str, Tensor], x: Tensor) -> Tensor:
        self.calls += 1
        return (x @ p["w"]).pow(2).mean()


def _params(dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    return {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)}


MISMATCHES = [
    ("adam_float32_state", unroll.adam(0.01), lambda s: s, torch.float64, TypeError,
     r"state\['exp_avg'\]\['w'\] has dtype torch.float32 but params\['w'\] has dtype torch.float64"),
    ("sgd_momentum_float32_state", unroll.sgd(0.1, momentum=0.9), lambda s: s, torch.float64, TypeError,
     r"state\['momentum_buffer'\]\['w'\] has dtype torch.float32"),
    ("buffer_on_other_device", unroll.adam(0.01),
     lambda s: {**s, "exp_avg": {"w": s["exp_avg"]["w"].to("meta")}}, torch.float32, ValueError,
     r"state\['exp_avg'\]\['w'\] is on meta but params\['w'\] is on cpu"),
    ("step_on_other_device", unroll.adam(0.01), lambda s: {**s, "step": torch.zeros(1, device="meta")},
     torch.float32, ValueError, r"state\['step'\] is on meta"),
    ("float64_lr_tensor", unroll.sgd(torch.tensor([0.1], dtype=torch.float64)), lambda s: s, torch.float32,
     TypeError, r"sgd: hyperparameter lr has dtype torch.float64 but params\['w'\] has dtype torch.float32, so the "
                r"update would become torch.float64"),
]


@pytest.mark.parametrize("opt, change, dtype, error, message", [m[1:] for m in MISMATCHES],
                         ids=[m[0] for m in MISMATCHES])
def test_dtype_and_device_mismatches_are_refused_before_any_work(opt: unroll.Optimizer, change: Any,
                                                                   dtype: torch.dtype, error: type,
                                                                   message: str) -> None:
    state = change(opt.init(_params()))  # made for float32 params
    loss = _Counting()
    x = torch.randn(4, 3, dtype=dtype)
    for entry in (unroll.surrogate_loss(loss, 2, optimizer=opt), unroll.train_step(loss, optimizer=opt)):
        with pytest.raises(error, match=message):
            entry(_params(dtype), state, x)
    assert loss.calls == 0
    with pytest.raises(error, match=message):
        opt.step(_params(dtype), {"w": torch.zeros(3, 2, dtype=dtype)}, state)


def test_a_tensor_hyperparameter_on_another_device_is_refused() -> None:
    # A 1-element tensor that is not 0-dim: torch does not combine it with tensors on another device.
    opt = unroll.adam(0.01, betas=(0.9, torch.full((1,), 0.99)))
    params = {"w": torch.zeros(3, 2, device="meta")}
    with pytest.raises(ValueError, match=r"adam: hyperparameter betas\[1\] is on cpu but params\['w'\] is on meta"):
        opt.check_state(params, opt.init(params))


def test_a_0dim_hyperparameter_of_another_dtype_is_refused_only_where_it_promotes() -> None:
    opt = unroll.adam(torch.tensor(0.01), betas=(torch.tensor(0.9), 0.999))  # float32, as torch.optim keeps them
    params = _params(torch.float64)
    new_params, _ = opt.step(params, {"w": torch.ones(3, 2, dtype=torch.float64)}, opt.init(params))
    assert new_params["w"].dtype == torch.float64
    scalar = {"s": torch.tensor(1.0, dtype=torch.float64)}
    with pytest.raises(TypeError, match=r"hyperparameter lr has dtype torch.float32 but params\['s'\]"):
        opt.check_state(scalar, opt.init(scalar))


def test_grads_of_another_dtype_are_refused_and_valid_states_pass() -> None:
    opt = unroll.adam(0.01)
    with pytest.raises(TypeError, match=r"grads\['w'\] has dtype torch.float64"):
        opt.step(_params(), {"w": torch.zeros(3, 2, dtype=torch.float64)}, opt.init(_params()))
    # float64 params keep torch.optim's float32 step counter; from_torch states pass as they are.
    opt.check_state(_params(torch.float64), opt.init(_params(torch.float64)))
    module = nn.Linear(3, 2).double()
    torch_opt = torch.optim.NAdam(module.parameters())
    module(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    torch_opt.step()
    mirror, state = unroll.from_torch(torch_opt, module)
    mirror.check_state({n: p.detach() for n, p in module.named_parameters()}, state)


# --------------------------------------------------------------- 4. nothing differentiable: torch's own error

@pytest.mark.parametrize("checkpoint", [False, True])
def test_surrogate_with_nothing_differentiable_raises_as_torch_does(checkpoint: bool) -> None:
    D, G = _models()
    real, z = _batch()
    opt = unroll.adam(0.01)
    params = _constants(D)
    surrogate = unroll.surrogate_loss(_d_loss(D), 3, optimizer=opt, checkpoint=checkpoint)
    value = surrogate(params, opt.init(params), real, G(z).detach(), buffers=dict(D.named_buffers()))
    assert not value.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        value.backward()


@pytest.mark.parametrize("closure", [False, True])
def test_gradients_still_reach_everything_outside_the_unroll(closure: bool) -> None:
    """Without a graph to constant params, gradients reach a tensor hyperparameter (through the updates only) and
    a closed-over tensor as when the params require grad (graph from step 0 on)."""
    params, x = _params(torch.float64), torch.randn(5, 3, dtype=torch.float64)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=closure)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opt = unroll.sgd(lr, momentum=0.5)
    wrt = (lr, scale) if closure else (lr,)

    def loss(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        return (scale * x @ p["w"]).pow(2).mean() + p["w"].pow(4).sum()  # closes over scale

    def grads(p: Dict[str, Tensor]) -> Tuple[Tensor, ...]:
        value = unroll.surrogate_loss(loss, 3, optimizer=opt, outer_fn=loss)(p, opt.init(params), x)
        return torch.autograd.grad(value, wrt)

    constant = grads(params)
    tracked = grads({n: t.clone().requires_grad_() for n, t in params.items()})
    torch.testing.assert_close(constant, tracked)
    assert all(float(g) != 0 for g in constant)


# ------------------------------------------------------------------ 5. step indices, step counts, from_torch

def test_a_nan_gradient_is_reported_at_its_own_step() -> None:
    def loss(p: Dict[str, Tensor], x: Tensor) -> Tensor:
        # A finite loss whose gradient is NaN at the first step only: sqrt's derivative at 0 times 0.
        w = p["w"]
        return (x @ w).pow(2).mean() + torch.where(w.abs() > 0, torch.zeros_like(w), w.abs().sqrt()).sum() * 0

    params = {"w": torch.zeros(3, 2)}
    opt = unroll.sgd(0.1)
    for entry in (unroll.unrolled_params(loss, 3, optimizer=opt), unroll.train_step(loss, optimizer=opt)):
        message = r"gradient of inner_fn has a non-finite entry \(nan\) at unrolled step 0 "
        with pytest.raises(unroll.NonFiniteLossError, match=message) as info:
            entry(params, opt.init(params), torch.randn(4, 3))
        assert (info.value.step, info.value.what) == (0, "gradient") and math.isnan(info.value.value)


@pytest.mark.parametrize("step, shown", [(-5.0, "-5.0"), (2.5, "2.5"), (math.inf, "inf")])
def test_a_step_count_that_is_not_a_whole_number_is_refused(step: float, shown: str) -> None:
    opt = unroll.adam(0.01)
    state = {**opt.init(_params()), "step": torch.tensor(step)}
    loss = _Counting()
    with pytest.raises(ValueError, match=rf"state\['step'\] must be a whole number .* got {shown}"):
        unroll.surrogate_loss(loss, 2, optimizer=opt)(_params(), state, torch.randn(4, 3))
    assert loss.calls == 0
    opt.check_state(_params(), {**state, "step": torch.tensor(3)})  # an integer count is fine


def _adam_at_step_3() -> Tuple[nn.Module, torch.optim.Adam]:
    module = nn.Linear(3, 2)
    torch_opt = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(3):
        torch_opt.zero_grad()
        module(torch.randn(4, 3)).pow(2).sum().backward()
        torch_opt.step()
    return module, torch_opt


def test_from_torch_refuses_a_state_it_would_have_to_guess() -> None:
    module, torch_opt = _adam_at_step_3()
    del torch_opt.state[module.weight]["exp_avg_sq"]
    with pytest.raises(ValueError, match=r"parameter 'weight' is at step 3 but has no 'exp_avg_sq'"):
        unroll.from_torch(torch_opt, module)
    module, torch_opt = _adam_at_step_3()
    for p in module.parameters():
        torch_opt.state[p]["step"] = torch.tensor(2.5)
    with pytest.raises(ValueError, match="step 2.5, not a whole number"):
        unroll.from_torch(torch_opt, module)


# ------------------------------------------------------------------------------------------------ 6. betas

@pytest.mark.parametrize("make", [unroll.adam, unroll.adamw, unroll.adamax, unroll.nadam, unroll.radam],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("betas, error", [(0.9, TypeError), ((0.9,), ValueError), ((0.9, 0.99, 0.999), ValueError),
                                          ("ab", TypeError)], ids=["number", "one", "three", "string"])
def test_betas_that_are_not_a_pair_are_named(make: Callable[..., unroll.Optimizer], betas: Any,
                                             error: type) -> None:
    with pytest.raises(error, match=r"^betas must be a pair \(beta1, beta2\)"):
        make(betas=betas)
