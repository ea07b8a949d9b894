"""Bad input raises a clear error (type and message naming the problem) before any work is done."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor

import unroll

ADAM = unroll.adam(0.01)


def _params() -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64),
            "b": torch.randn(2, generator=gen, dtype=torch.float64)}


def _x() -> Tensor:
    return torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class CountingLoss:
    """A least-squares inner loss that counts its calls; ``result`` replaces its return value."""

    def __init__(self, result: Any = None) -> None:
        self.calls = 0
        self.result = result

    def returning(self, result: Any) -> CountingLoss:
        self.result = result
        return self

    def __call__(self, params: Dict[str, Tensor], x: Tensor, scale: Any = 1.0) -> Any:
        self.calls += 1
        if self.result is not None:
            return self.result
        return scale * (x @ params["w"] + params["b"]).pow(2).mean()


def _surrogate(loss: CountingLoss, K: Any = 2, *, optimizer: Any = ADAM, params: Any = None, state: Any = None,
               **kwargs: Any) -> Any:
    """Build and call ``surrogate_loss`` with defaults that are all valid unless overridden."""
    buffers = kwargs.pop("buffers", None)
    params = _params() if params is None else params
    state = ADAM.init(_params()) if state is None else state
    return unroll.surrogate_loss(loss, K, optimizer=optimizer, **kwargs)(params, state, _x(), buffers=buffers)


def _unrolled(loss: CountingLoss, K: Any = 2, *, state: Any = None, **kwargs: Any) -> Any:
    buffers = kwargs.pop("buffers", None)
    state = ADAM.init(_params()) if state is None else state
    return unroll.unrolled_params(loss, K, optimizer=ADAM, **kwargs)(_params(), state, _x(), buffers=buffers)


def _adam_state(**changes: Any) -> Dict[str, Any]:
    """A valid Adam state for ``_params()`` with top-level entries replaced (``None`` deletes the entry)."""
    state = ADAM.init(_params())
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


def _buffer(**tensors: Tensor) -> Dict[str, Tensor]:
    return dict(tensors)


ZEROS_W, ZEROS_B = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)

# (id, call(loss), exception, message fragment, inner_fn calls before the error: a bad return value is only
# seen on the first call, which must then fail before any optimizer step or further call)
Case = Tuple[str, Callable[[CountingLoss], Any], type, str, int]
SURROGATE_CASES: List[Case] = [
    # K
    ("K_negative", lambda f: _surrogate(f, -1), ValueError, "must be >= 0, got -1", 0),
    ("K_float", lambda f: _surrogate(f, 2.0), TypeError, "K (the number of unrolled steps) must be an int", 0),
    ("K_fraction", lambda f: _surrogate(f, 2.5), TypeError, "must be an int, got float", 0),
    ("K_bool", lambda f: _surrogate(f, True), TypeError, "must be an int, got bool", 0),
    ("K_str", lambda f: _surrogate(f, "3"), TypeError, "must be an int, got str", 0),
    ("K_none", lambda f: _surrogate(f, None), TypeError, "must be an int, got NoneType", 0),
    ("unrolled_K_negative", lambda f: _unrolled(f, -3), ValueError, "must be >= 0, got -3", 0),
    ("unrolled_K_float", lambda f: _unrolled(f, 1.0), TypeError, "must be an int, got float", 0),
    # inner_fn's return value: the first call fails, before any optimizer step.
    ("inner_returns_float", lambda f: _surrogate(f.returning(1.0), 5), TypeError,
     "inner_fn must return a scalar tensor, got float", 1),
    ("inner_returns_tuple", lambda f: _surrogate(f.returning(()), 5), TypeError,
     "inner_fn must return a scalar tensor, got tuple", 1),
    ("inner_returns_vector", lambda f: _surrogate(f.returning(torch.ones(3)), 5), ValueError,
     "inner_fn must return a scalar (0-dim) tensor, got shape (3,)", 1),
    ("inner_returns_int_tensor", lambda f: _surrogate(f.returning(torch.tensor(1)), 5), TypeError,
     "inner_fn must return a floating-point tensor", 1),
    ("inner_returns_vector_K0", lambda f: _surrogate(f.returning(torch.ones(2, 1)), 0), ValueError,
     "inner_fn must return a scalar (0-dim) tensor, got shape (2, 1)", 1),
    ("unrolled_inner_returns_vector", lambda f: _unrolled(f.returning(torch.ones(3)), 5), ValueError,
     "inner_fn must return a scalar (0-dim) tensor", 1),
    ("outer_returns_vector", lambda f: _surrogate(f, outer_fn=lambda p, x: p["b"]), ValueError,
     "outer_fn must return a scalar (0-dim) tensor, got shape (2,)", 2),
    # params
    ("empty_params", lambda f: _surrogate(f, params={}), ValueError, "params is empty", 0),
    ("int_params", lambda f: _surrogate(f, params={"w": torch.zeros(3, 2, dtype=torch.long), "b": ZEROS_B}),
     TypeError, "params['w'] has dtype torch.int64", 0),
    ("params_not_mapping", lambda f: _surrogate(f, params=[ZEROS_W, ZEROS_B]), TypeError,
     "params must be a mapping", 0),
    # state
    ("state_missing_entry", lambda f: _surrogate(f, state=_adam_state(exp_avg_sq=None)), KeyError,
     "missing ['exp_avg_sq']", 0),
    ("state_extra_entry", lambda f: _surrogate(f, state=_adam_state(square_avg=_buffer(w=ZEROS_W, b=ZEROS_B))),
     KeyError, "unexpected ['square_avg']", 0),
    ("state_wrong_buffer_keys", lambda f: _surrogate(f, state=_adam_state(exp_avg=_buffer(w=ZEROS_W, c=ZEROS_B))),
     KeyError, "state['exp_avg'] keys do not match params: missing ['b'], unexpected ['c']", 0),
    ("state_from_rmsprop", lambda f: _surrogate(f, state=unroll.rmsprop().init(_params())), KeyError,
     "adam state keys do not match the expected state entries", 0),
    ("state_buffer_shape", lambda f: _surrogate(f, state=_adam_state(exp_avg=_buffer(w=ZEROS_W, b=ZEROS_W))),
     ValueError, "state['exp_avg']['b'] has shape (3, 2)", 0),
    ("state_step_not_tensor", lambda f: _surrogate(f, state=_adam_state(step=0)), TypeError,
     "state['step'] must be a tensor", 0),
    ("state_not_mapping", lambda f: _surrogate(f, state=[1, 2]), TypeError, "state must be the dict", 0),
    ("unrolled_state_missing_entry", lambda f: _unrolled(f, state=_adam_state(exp_avg=None)), KeyError,
     "missing ['exp_avg']", 0),
    # buffers
    ("buffers_overlap_params", lambda f: _surrogate(f, buffers={"w": ZEROS_W}), KeyError,
     "buffers and params share the names ['w']", 0),
    ("unrolled_buffers_overlap_params", lambda f: _unrolled(f, buffers={"b": ZEROS_B}), KeyError,
     "share the names ['b']", 0),
    ("buffers_not_tensors", lambda f: _surrogate(f, buffers={"running_mean": [0.0]}), TypeError,
     "buffers['running_mean'] must be a torch.Tensor", 0),
    # callables and optimizer
    ("inner_not_callable", lambda f: unroll.surrogate_loss("loss", 1, optimizer=ADAM), TypeError,
     "inner_fn must be callable, got str", 0),
    ("unrolled_inner_not_callable", lambda f: unroll.unrolled_params(None, 1, optimizer=ADAM), TypeError,
     "inner_fn must be callable", 0),
    ("outer_not_callable", lambda f: _surrogate(f, outer_fn=1.0), TypeError, "outer_fn must be callable", 0),
    ("step_args_not_callable", lambda f: _surrogate(f, step_args=(1, 2)), TypeError, "step_args must be callable", 0),
    ("step_args_returns_list", lambda f: _surrogate(f, step_args=lambda k, x: [x]), TypeError,
     "step_args must return a tuple", 0),
    ("optimizer_torch", lambda f: _surrogate(f, optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1)), TypeError,
     "optimizer must be an unroll.Optimizer", 0),
    ("optimizer_factory", lambda f: _surrogate(f, optimizer=unroll.adam), TypeError,
     "optimizer must be an unroll.Optimizer", 0),
    ("unrolled_optimizer_str", lambda f: unroll.unrolled_params(f, 1, optimizer="adam"), TypeError,
     "got str", 0),
]


@pytest.mark.parametrize("call, error, fragment, calls_allowed", [c[1:] for c in SURROGATE_CASES],
                         ids=[c[0] for c in SURROGATE_CASES])
def test_surrogate_bad_input(call: Callable[[CountingLoss], Any], error: type, fragment: str,
                             calls_allowed: int) -> None:
    loss = CountingLoss()
    with pytest.raises(error) as info:
        call(loss)
    assert fragment in str(info.value)
    assert loss.calls == calls_allowed


# -------------------------------------------------------------------------------------------- optimizer.init/step

STATEFUL = [unroll.sgd(0.1, momentum=0.9), unroll.adam(), unroll.rmsprop(centered=True), unroll.adagrad(),
            unroll.nadam()]


def _step_with(optimizer: unroll.Optimizer, *, params: Any = None, grads: Any = None, state: Any = None) -> Any:
    params = _params() if params is None else params
    grads = {k: torch.ones_like(v) for k, v in _params().items()} if grads is None else grads
    state = optimizer.init(_params()) if state is None else state
    return optimizer.step(params, grads, state)


def _other_optimizers_state(optimizer: unroll.Optimizer) -> Dict[str, Any]:
    other = STATEFUL[(STATEFUL.index(optimizer) + 1) % len(STATEFUL)]
    return other.init(_params())


def _with_buffer_keys(optimizer: unroll.Optimizer, keys: Tuple[str, ...]) -> Dict[str, Any]:
    state = optimizer.init(_params())
    buffer = optimizer.buffers[0]
    state[buffer] = {k: torch.zeros(2, dtype=torch.float64) for k in keys}
    return state


OptimizerCase = Tuple[str, Callable[[unroll.Optimizer], Any], type, str]
OPTIMIZER_CASES: List[OptimizerCase] = [
    ("init_empty", lambda o: o.init({}), ValueError, "params is empty"),
    ("init_int", lambda o: o.init({"w": torch.arange(3)}), TypeError, "params['w'] has dtype torch.int64"),
    ("init_not_tensor", lambda o: o.init({"w": [1.0]}), TypeError, "params['w'] must be a torch.Tensor"),
    ("step_empty", lambda o: o.step({}, {}, o.init(_params())), ValueError, "params is empty"),
    ("step_int_params", lambda o: _step_with(o, params={"w": torch.zeros(3, 2, dtype=torch.int32), "b": ZEROS_B}),
     TypeError, "dtype torch.int32"),
    ("grads_missing_key", lambda o: _step_with(o, grads={"w": ZEROS_W}), KeyError,
     "grads keys do not match params: missing ['b']"),
    ("grads_extra_key", lambda o: _step_with(o, grads={"w": ZEROS_W, "b": ZEROS_B, "c": ZEROS_B}), KeyError,
     "grads keys do not match params: unexpected ['c']"),
    ("grads_shape", lambda o: _step_with(o, grads={"w": ZEROS_W.T, "b": ZEROS_B}), ValueError,
     "grads['w'] has shape (2, 3) but the parameter has shape (3, 2)"),
    ("grads_int", lambda o: _step_with(o, grads={"w": ZEROS_W.long(), "b": ZEROS_B}), TypeError,
     "grads['w'] has dtype torch.int64"),
    ("state_missing_step", lambda o: _step_with(o, state={k: v for k, v in o.init(_params()).items() if k != "step"}),
     KeyError, "missing ['step']"),
    ("state_extra_entry", lambda o: _step_with(o, state={**o.init(_params()), "extra": {}}), KeyError,
     "unexpected ['extra']"),
    ("state_buffer_missing_param", lambda o: _step_with(o, state=_with_buffer_keys(o, ("b",))), KeyError,
     "keys do not match params: missing ['w']"),
    ("state_buffer_extra_param", lambda o: _step_with(o, state=_with_buffer_keys(o, ("w", "b", "z"))), KeyError,
     "keys do not match params: unexpected ['z']"),
    ("state_of_other_optimizer", lambda o: _step_with(o, state=_other_optimizers_state(o)), KeyError,
     "state keys do not match the expected state entries"),
]


@pytest.mark.parametrize("optimizer", STATEFUL, ids=lambda o: o.name)
@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in OPTIMIZER_CASES],
                         ids=[c[0] for c in OPTIMIZER_CASES])
def test_optimizer_bad_input(optimizer: unroll.Optimizer, call: Callable[[unroll.Optimizer], Any], error: type,
                             fragment: str) -> None:
    with pytest.raises(error) as info:
        call(optimizer)
    assert fragment in str(info.value)


def test_nadam_rejects_a_mu_product_shaped_like_the_parameter() -> None:
    nadam = unroll.nadam()
    state = nadam.init(_params())
    state["mu_product"] = {k: torch.ones_like(v) for k, v in _params().items()}
    with pytest.raises(ValueError, match=r"state\['mu_product'\]\['w'\] must be a 0-dim tensor .* shape \(3, 2\)"):
        _step_with(nadam, state=state)


def test_sgd_without_momentum_rejects_a_momentum_state() -> None:
    with pytest.raises(KeyError, match=r"unexpected \['momentum_buffer'\]"):
        _step_with(unroll.sgd(0.1), state=unroll.sgd(0.1, momentum=0.9).init(_params()))


# ------------------------------------------------------------------------------------------------ hyperparameters

HYPERPARAMETER_CASES = [
    ("sgd_negative_lr", lambda: unroll.sgd(-0.1), ValueError, "Invalid learning rate: -0.1"),
    ("adam_negative_lr", lambda: unroll.adam(-1e-3), ValueError, "Invalid learning rate"),
    ("rmsprop_negative_lr", lambda: unroll.rmsprop(-1e-2), ValueError, "Invalid learning rate"),
    ("tensor_negative_lr", lambda: unroll.adam(torch.tensor(-1e-3)), ValueError, "Invalid learning rate"),
    ("tensor_lr_not_scalar", lambda: unroll.adam(torch.tensor([1e-3, 1e-3])), ValueError, "1-element"),
    ("lr_str", lambda: unroll.sgd("0.1"), TypeError, "learning rate must be a real number"),
    ("lr_bool", lambda: unroll.sgd(True), TypeError, "learning rate must be a real number"),
    ("adam_beta1_one", lambda: unroll.adam(betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
    ("adam_beta2_above_one", lambda: unroll.adam(betas=(0.9, 1.5)), ValueError, "beta parameter at index 1"),
    ("adam_beta1_negative", lambda: unroll.adam(betas=(-0.1, 0.999)), ValueError, "beta parameter at index 0"),
    ("adam_negative_eps", lambda: unroll.adam(eps=-1e-8), ValueError, "epsilon"),
    ("adam_negative_weight_decay", lambda: unroll.adam(weight_decay=-0.1), ValueError, "weight_decay"),
    ("sgd_nesterov_without_momentum", lambda: unroll.sgd(0.1, nesterov=True), ValueError, "Nesterov"),
    ("sgd_nesterov_with_dampening", lambda: unroll.sgd(0.1, momentum=0.9, dampening=0.1, nesterov=True),
     ValueError, "zero dampening"),
    ("sgd_negative_momentum", lambda: unroll.sgd(0.1, momentum=-0.9), ValueError, "Invalid momentum value"),
    ("rmsprop_negative_alpha", lambda: unroll.rmsprop(alpha=-0.5), ValueError, "Invalid alpha value"),
    ("rmsprop_negative_momentum", lambda: unroll.rmsprop(momentum=-0.5), ValueError, "Invalid momentum value"),
    ("adagrad_negative_lr_decay", lambda: unroll.adagrad(lr_decay=-0.1), ValueError,
     "Invalid lr_decay value: -0.1"),
    ("adagrad_negative_initial_value", lambda: unroll.adagrad(initial_accumulator_value=-1.0), ValueError,
     "Invalid initial_accumulator_value value: -1.0"),
    ("nadam_negative_momentum_decay", lambda: unroll.nadam(momentum_decay=-1e-3), ValueError,
     "Invalid momentum_decay value: -0.001"),
    ("radam_beta2_one", lambda: unroll.radam(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    ("adamw_negative_weight_decay", lambda: unroll.adamw(weight_decay=-0.01), ValueError,
     "Invalid weight_decay value: -0.01"),
    ("adamax_negative_eps", lambda: unroll.adamax(eps=-1.0), ValueError, "Invalid epsilon value: -1.0"),
    # Optimizer's own fields (for optimizers built by hand)
    ("initial_value_of_unknown_buffer",
     lambda: unroll.Optimizer("mine", {}, ("sum",), lambda *a: a[:2], initial_values={"summ": 1.0}), ValueError,
     "may only name buffers ['sum'], got ['summ']"),
    ("packable_scalar_buffer",
     lambda: unroll.Optimizer("mine", {}, ("mu",), lambda *a: a[:2], scalar_buffers=("mu",)), ValueError,
     "scalar buffers ['mu'] cannot be packed with the parameters; pass packable=False"),
]


@pytest.mark.parametrize("build, error, fragment", [c[1:] for c in HYPERPARAMETER_CASES],
                         ids=[c[0] for c in HYPERPARAMETER_CASES])
def test_invalid_hyperparameters(build: Callable[[], Any], error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        build()
    assert fragment in str(info.value)


NAN = math.nan
TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                 "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad, "adamax": torch.optim.Adamax,
                 "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}
_ADAM_FAMILY_NAN = [({"lr": NAN}, "Invalid learning rate: nan"), ({"eps": NAN}, "Invalid epsilon value: nan"),
                    ({"betas": (NAN, 0.999)}, "Invalid beta parameter at index 0: nan"),
                    ({"betas": (0.9, NAN)}, "Invalid beta parameter at index 1: nan"),
                    ({"weight_decay": NAN}, "Invalid weight_decay value: nan")]
# (optimizer, arguments with one NaN, torch.optim's message for it)
NAN_CASES = [
    *[("sgd", {"lr": 0.1, **o}, m) for o, m in [({"lr": NAN}, "Invalid learning rate: nan"),
                                                ({"momentum": NAN}, "Invalid momentum value: nan"),
                                                ({"dampening": NAN}, "Invalid dampening value: nan"),
                                                ({"weight_decay": NAN}, "Invalid weight_decay value: nan")]],
    *[(name, o, m) for name in ("adam", "adamw", "adamax", "nadam", "radam") for o, m in _ADAM_FAMILY_NAN],
    ("adam", {"lr": torch.tensor(NAN)}, "Invalid learning rate: nan"),
    ("nadam", {"momentum_decay": NAN}, "Invalid momentum_decay value: nan"),
    *[("rmsprop", o, m) for o, m in [({"lr": NAN}, "Invalid learning rate: nan"),
                                     ({"alpha": NAN}, "Invalid alpha value: nan"),
                                     ({"eps": NAN}, "Invalid epsilon value: nan"),
                                     ({"momentum": NAN}, "Invalid momentum value: nan"),
                                     ({"weight_decay": NAN}, "Invalid weight_decay value: nan")]],
    *[("adagrad", o, m) for o, m in [({"lr": NAN}, "Invalid learning rate: nan"),
                                     ({"lr_decay": NAN}, "Invalid lr_decay value: nan"),
                                     ({"weight_decay": NAN}, "Invalid weight_decay value: nan"),
                                     ({"initial_accumulator_value": NAN},
                                      "Invalid initial_accumulator_value value: nan"),
                                     ({"eps": NAN}, "Invalid epsilon value: nan")]],
]


def _nan_case_id(name: str, options: Dict[str, Any], message: str) -> str:
    tensor = any(isinstance(v, Tensor) for v in options.values())
    return f"{name}-{message[len('Invalid '):-len(': nan')]}" + ("-tensor" if tensor else "")


@pytest.mark.parametrize("name, options, message", NAN_CASES, ids=[_nan_case_id(*c) for c in NAN_CASES])
def test_nan_hyperparameters_are_rejected_with_torch_messages(name: str, options: Dict[str, Any],
                                                               message: str) -> None:
    with pytest.raises(ValueError) as ours:
        getattr(unroll, name)(**options)
    assert str(ours.value).startswith(message)
    try:
        TORCH_CLASSES[name]([torch.zeros(2, requires_grad=True)], **options)
    except ValueError as theirs:
        assert str(theirs) == message
    else:
        # torch.optim.SGD checks `lr < 0.0` etc., which NaN passes (and never checks dampening): we are stricter.
        assert name == "sgd"


# ------------------------------------------------------------------------------------------- non-finite inner loss

def _nan_at_step(step: int) -> Callable[..., Tuple[Any, ...]]:
    """``step_args`` that scales the inner loss by NaN at exactly unrolled step ``step``."""
    return lambda k, x, scale: (x, math.nan if k == step else scale)


@pytest.mark.parametrize("entry", ["surrogate_loss", "unrolled_params"])
def test_non_finite_inner_loss_names_the_step(entry: str) -> None:
    loss = CountingLoss()
    build = getattr(unroll, entry)
    run = build(loss, 4, optimizer=ADAM, step_args=_nan_at_step(2))
    with pytest.raises(unroll.NonFiniteLossError) as info:
        run(_params(), ADAM.init(_params()), _x(), 1.0)
    assert info.value.step == 2
    assert math.isnan(info.value.value)
    assert "step 2" in str(info.value)
    assert isinstance(info.value, FloatingPointError)


def test_non_finite_check_can_be_disabled() -> None:
    run = unroll.unrolled_params(CountingLoss(), 4, optimizer=ADAM, step_args=_nan_at_step(2), check_finite=False)
    params, _ = run(_params(), ADAM.init(_params()), _x(), 1.0)
    # The NaN gradient of step 2 reached the parameters: the check above was what stopped it.
    assert not torch.isfinite(params["w"]).all()
