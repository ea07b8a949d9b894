"""unroll.sgd/adam/rmsprop: torch.optim parity, purity, differentiability, finite meta-gradients at zero gradients.

The ``_assert_*`` helpers take any optimizer by name; test_optimizers_more.py runs them on the other optimizers.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
from typing import Any, Callable, Dict, Iterator, List, Mapping, Tuple

import pytest
import torch
from torch import Tensor

import unroll

GradSequence = Callable[..., List[Dict[str, Tensor]]]  # the random_grads fixture (see conftest.py)
TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop,
                 # tested in test_optimizers_more.py, except for their defaults below
                 "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad, "adamax": torch.optim.Adamax,
                 "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}
SHAPES = {"weight": (4, 3), "bias": (4,), "kernel": (2, 3, 2), "scale": ()}
PARITY_STEPS = 50
PARITY_ATOL = 1e-6

SGD_OPTIONS = [
    dict(lr=0.05, momentum=m, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for m, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.1), (False, True))
    if not n or (m > 0 and d == 0)  # torch.optim rejects Nesterov without momentum or with dampening
]
ADAM_OPTIONS = [
    dict(lr=0.01, amsgrad=a, maximize=mx, weight_decay=wd)
    for a, mx, wd in itertools.product((False, True), (False, True), (0.0, 0.1))
]
RMSPROP_OPTIONS = [
    dict(lr=0.01, momentum=m, centered=c, weight_decay=wd, maximize=mx)
    for m, c, wd, mx in itertools.product((0.0, 0.9), (False, True), (0.0, 0.1), (False, True))
]
ALL_OPTIONS = ([("sgd", o) for o in SGD_OPTIONS] + [("adam", o) for o in ADAM_OPTIONS]
               + [("rmsprop", o) for o in RMSPROP_OPTIONS])
# Non-default moment rates, e.g. the paper's Adam(beta1=0.5).
OTHER_HYPERPARAMS = [
    ("adam", dict(lr=1e-3, betas=(0.5, 0.999), eps=1e-6)),
    ("adam", dict(lr=0.02, betas=(0.0, 0.9), amsgrad=True)),
    ("rmsprop", dict(lr=1e-3, alpha=0.9, eps=1e-6, centered=True)),
    ("rmsprop", dict(lr=0.02, alpha=0.5, momentum=0.5)),
]
# The plain configuration of each optimizer and ones that use every state buffer and option it has.
RICH_OPTIONS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("adam", dict(lr=0.05)),
    ("adam", dict(lr=0.05, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, maximize=True)),
]


def _case_id(case: Tuple[str, Dict[str, Any]]) -> str:
    name, options = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in options.items())


def _make(name: str, options: Mapping[str, Any]) -> unroll.Optimizer:
    return getattr(unroll, name)(**options)


def _params(dtype: torch.dtype, seed: int = 0) -> Dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for name, shape in SHAPES.items()}


def _leaves(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    else:
        for value in tree:
            yield from _leaves(value)


def _clone(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_clone(v) for v in tree)
    return tree.clone()


def _assert_bit_identical(actual: Any, expected: Any) -> None:
    if isinstance(expected, Mapping):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_bit_identical(actual[key], expected[key])
    else:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)


def _run(optimizer: unroll.Optimizer, params: Dict[str, Tensor], grad_sequence: List[Dict[str, Tensor]],
         state: Dict[str, Any] | None = None) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    state = optimizer.init(params) if state is None else state
    for grads in grad_sequence:
        params, state = optimizer.step(params, grads, state)
    return params, state


# ---------------------------------------------------------------------------------------------- torch.optim parity

def _assert_parity(name: str, options: Dict[str, Any], random_grads: GradSequence) -> None:
    params = _params(torch.float32)
    grad_sequence = random_grads(params, PARITY_STEPS, seed=1)
    leaves = {k: p.clone() for k, p in params.items()}
    torch_opt = TORCH_CLASSES[name](leaves.values(), **options)
    optimizer = _make(name, options)
    state = optimizer.init(params)
    for step, grads in enumerate(grad_sequence):
        for key, leaf in leaves.items():
            leaf.grad = grads[key].clone()
        torch_opt.step()
        params, state = optimizer.step(params, grads, state)
        worst = max((params[k] - leaves[k]).abs().max().item() for k in leaves)
        assert worst <= PARITY_ATOL, f"step {step}: max abs diff {worst:.3g} from torch.optim"
    assert int(state["step"]) == PARITY_STEPS
    for buffer in optimizer.buffers:
        for key, leaf in leaves.items():
            # Relative: RMSProp's momentum buffer accumulates g / sqrt(v) and grows well beyond 1.
            expected = torch_opt.state[leaf][buffer]
            diff = (state[buffer][key] - expected).abs().max().item()
            scale = max(1.0, expected.abs().max().item())
            assert diff <= PARITY_ATOL * scale, f"state[{buffer!r}][{key!r}] differs from torch.optim by {diff:.3g}"


@pytest.mark.parametrize("case", ALL_OPTIONS + OTHER_HYPERPARAMS, ids=_case_id)
def test_matches_torch_optim_for_50_steps(case: Tuple[str, Dict[str, Any]], random_grads: GradSequence) -> None:
    _assert_parity(*case, random_grads)


def test_parity_grid_covers_every_option_combination() -> None:
    # 20 valid SGD combinations (Nesterov needs momentum and no dampening), 2^3 Adam, 2^4 RMSprop.
    assert len({_case_id(c) for c in ALL_OPTIONS}) == len(ALL_OPTIONS) == 20 + 8 + 16


@pytest.mark.parametrize("name, torch_cls", TORCH_CLASSES.items())
def test_defaults_match_torch_optim(name: str, torch_cls: type, random_grads: GradSequence) -> None:
    ours = inspect.signature(getattr(unroll, name)).parameters
    theirs = inspect.signature(torch_cls.__init__).parameters
    implementation_only = {"self", "params", "foreach", "fused", "capturable", "differentiable"}
    assert set(ours) == set(theirs) - implementation_only
    # The contract makes SGD's learning rate a required argument; everything else defaults like torch.
    required = {"lr"} if name == "sgd" else set()
    for arg, parameter in ours.items():
        if arg in required:
            assert parameter.default is inspect.Parameter.empty
        else:
            assert parameter.default == theirs[arg].default, arg
    _assert_parity(name, {"lr": 0.01} if name == "sgd" else {}, random_grads)


def _assert_keeps_dtype_and_shape(optimizer: unroll.Optimizer, dtype: torch.dtype,
                                  random_grads: GradSequence) -> None:
    # Includes a 0-dim parameter: 0-dim float64 intermediates (e.g. bias corrections) must not promote it.
    params = _params(dtype)
    new_params, new_state = _run(optimizer, params, random_grads(params, 2, seed=7))
    step_like = (optimizer.init(params)["step"].dtype, ())
    for key, p in params.items():
        assert (new_params[key].dtype, new_params[key].shape) == (dtype, p.shape), key
        for buffer in optimizer.buffers:
            # Scalar buffers (NAdam's mu_product) stay 0-dim in the step's dtype, as in torch.optim.
            expected = step_like if buffer in optimizer.scalar_buffers else (dtype, p.shape)
            assert (new_state[buffer][key].dtype, new_state[buffer][key].shape) == expected, (buffer, key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_step_keeps_dtype_and_shape(case: Tuple[str, Dict[str, Any]], dtype: torch.dtype,
                                    random_grads: GradSequence) -> None:
    _assert_keeps_dtype_and_shape(_make(*case), dtype, random_grads)


# ---------------------------------------------------------------------------------------------------------- purity

def _assert_step_is_pure(optimizer: unroll.Optimizer, random_grads: GradSequence) -> None:
    params = _params(torch.float32)
    warmup = random_grads(params, 3, seed=2)
    params, state = _run(optimizer, params, warmup[:2])  # a state that is not all zeros
    grads = warmup[2]
    before = _clone((params, grads, state))

    new_params, new_state = optimizer.step(params, grads, state)

    _assert_bit_identical(params, before[0])
    _assert_bit_identical(grads, before[1])
    _assert_bit_identical(state, before[2])
    inputs = {t.untyped_storage().data_ptr() for t in _leaves((params, grads, state))}
    changed = 0
    old_leaves, new_leaves = list(_leaves((params, state))), list(_leaves((new_params, new_state)))
    assert len(old_leaves) == len(new_leaves)
    for old, new in zip(old_leaves, new_leaves):
        if not torch.equal(old, new):
            changed += 1
            assert new.untyped_storage().data_ptr() not in inputs, "a changed output aliases an input tensor"
    assert changed > 0
    # Writing into the outputs must not reach the inputs either.
    for t in _leaves((new_params, new_state)):
        t.add_(1.0)
    _assert_bit_identical(params, before[0])
    _assert_bit_identical(state, before[2])


@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_step_is_pure(case: Tuple[str, Dict[str, Any]], random_grads: GradSequence) -> None:
    _assert_step_is_pure(_make(*case), random_grads)


# ------------------------------------------------------------------------------------------------ differentiability

TENSOR_HYPERPARAMS = ("lr", "weight_decay")


def _flat_step_fn(name: str, options: Dict[str, Any], params: Dict[str, Tensor], state: Dict[str, Any] | None,
                  n_steps: int) -> Tuple[Any, Tuple[Tensor, ...]]:
    """``(f, inputs)``: ``f(lr, weight_decay, *params, *grads of each step, *state buffers)`` runs ``n_steps``
    steps and returns every new param and buffer; ``state=None`` starts from ``init`` (not an input then)."""
    names = list(params)
    n = len(names)
    buffers = [] if state is None else [(b, k) for b in _make(name, options).buffers for k in names]
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(params[k].shape, generator=gen, dtype=torch.float64) for _ in range(n_steps) for k in names]
    hypers = [torch.tensor(float(options[h]), dtype=torch.float64) for h in TENSOR_HYPERPARAMS]
    inputs = (*hypers, *params.values(), *grads, *(state[b][k] for b, k in buffers))
    # float64 throughout, including 0-dim buffers torch.optim keeps in float32 (NAdam's mu_product).
    inputs = tuple(t.detach().to(torch.float64).clone().requires_grad_(True) for t in inputs)

    def f(*flat: Tensor) -> Tuple[Tensor, ...]:
        hyper_values, flat = flat[:len(TENSOR_HYPERPARAMS)], flat[len(TENSOR_HYPERPARAMS):]
        opt = _make(name, {**options, **dict(zip(TENSOR_HYPERPARAMS, hyper_values))})
        p = dict(zip(names, flat[:n]))
        if state is None:
            s = opt.init(p)
        else:
            given = dict(zip(buffers, flat[n + n * n_steps:]))
            s = {"step": state["step"].clone(), **{b: {k: given[b, k] for k in names} for b in opt.buffers}}
        for t in range(n_steps):
            p, s = opt.step(p, dict(zip(names, flat[n + t * n:n + (t + 1) * n])), s)
        return (*p.values(), *(s[b][k] for b in opt.buffers for k in names))

    return f, inputs


def _assert_step_gradients(name: str, options: Dict[str, Any], warm_steps: int, n_steps: int,
                           random_grads: GradSequence) -> None:
    """d(new params, new buffers) / d(lr, weight_decay, params, grads, state buffers) in float64 (gradcheck),
    over ``n_steps`` steps from ``init`` (``warm_steps=0``) or from the state after ``warm_steps`` steps."""
    # Weight decay must be on for its derivative to be checked.
    options = {**options, "weight_decay": options.get("weight_decay", 0.0) or 0.05}
    params = {"w": _params(torch.float64)["weight"][:2], "b": _params(torch.float64, seed=1)["bias"][:3]}
    state = None
    if warm_steps:
        # Buffers from real steps with large gradients: with tiny second moments the update is so curved in them
        # that finite differences become inaccurate.
        warmup = [{k: 10 * g for k, g in grads.items()}
                  for grads in random_grads(params, warm_steps, seed=4, zero_fraction=0)]
        _, state = _run(_make(name, options), params, warmup)
    f, inputs = _flat_step_fn(name, options, params, state, n_steps)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)
    # The tensor hyperparameters really influence the result (so the check above is not vacuous for them).
    d_hypers = torch.autograd.grad(sum(out.sum() for out in f(*inputs)), inputs[:len(TENSOR_HYPERPARAMS)])
    assert all(d.abs() > 0 for d in d_hypers)


@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("warm_state", [False, True], ids=["init_state", "warm_state"])
@pytest.mark.parametrize("case", RICH_OPTIONS, ids=_case_id)
def test_step_gradients_match_finite_differences(case: Tuple[str, Dict[str, Any]], warm_state: bool, n_steps: int,
                                                 random_grads: GradSequence) -> None:
    _assert_step_gradients(*case, warm_steps=2 if warm_state else 0, n_steps=n_steps, random_grads=random_grads)


# ------------------------------------------------------------------------------ zero gradients: finite meta-grads

ZERO_GRAD_OPTIONS = [
    ("adam", dict(lr=0.05)),
    ("adam", dict(lr=0.05, amsgrad=True)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, centered=True)),
    ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9)),
]


Loss = Callable[[Mapping[str, Tensor]], Tensor]


def _dead_relu_problem(mlp_params: Any, mlp_forward: Any) -> Tuple[Dict[str, Tensor], Loss, Loss]:
    """``(theta0, inner_loss, outer_loss)`` for a ReLU MLP whose hidden units 0 and 1 are dead for every input,
    so their weights and biases get exactly zero gradients."""
    theta0 = mlp_params([3, 6, 1], seed=5)
    theta0["b0"][:2] = -50.0
    gen = torch.Generator().manual_seed(6)
    x, y, x2, y2 = (torch.randn(n, generator=gen, dtype=torch.float64) for n in [(8, 3), (8, 1), (8, 3), (8, 1)])

    def squared_error(x: Tensor, y: Tensor) -> Loss:
        return lambda params: (mlp_forward(params, x, torch.relu) - y).pow(2).mean()

    return theta0, squared_error(x, y), squared_error(x2, y2)


def _meta_gradient(optimizer: unroll.Optimizer, theta0: Dict[str, Tensor], inner_loss: Loss, outer_loss: Loss,
                   steps: int = 3) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """``(theta_steps, d outer_loss(theta_steps) / d theta0)``, differentiating through every optimizer step."""
    theta0 = {k: v.detach().clone().requires_grad_(True) for k, v in theta0.items()}
    params, state = dict(theta0), optimizer.init(theta0)
    for _ in range(steps):
        grads = dict(zip(params, torch.autograd.grad(inner_loss(params), list(params.values()), create_graph=True)))
        assert (grads["w0"][:2] == 0).all() and (grads["b0"][:2] == 0).all()  # the premise of the test
        params, state = optimizer.step(params, grads, state)
    meta = torch.autograd.grad(outer_loss(params), list(theta0.values()))
    return {k: v.detach() for k, v in params.items()}, dict(zip(theta0, meta))


def _assert_finite_meta_gradients(name: str, options: Dict[str, Any], mlp_params: Any, mlp_forward: Any,
                                  monkeypatch: pytest.MonkeyPatch, steps: int = 3, uses_sqrt: bool = True,
                                  update_module: str | None = None) -> None:
    """Finite meta-gradients through ``steps`` steps with dead units, forward values those of torch.optim, and, if
    the update ``uses_sqrt``, NaN ones once the safe_sqrt of ``update_module`` (default ``unroll.<name>``) is a
    plain torch.sqrt."""
    theta0, inner_loss, outer_loss = _dead_relu_problem(mlp_params, mlp_forward)
    theta_k, meta = _meta_gradient(_make(name, options), theta0, inner_loss, outer_loss, steps)
    for key, g in meta.items():
        assert torch.isfinite(g).all(), f"non-finite meta-gradient for {key}"
    assert meta["w0"][2:].abs().sum() > 0  # live units do get a meta-gradient

    # Forward values are torch.optim's.
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    torch_opt = TORCH_CLASSES[name](leaves.values(), **options)
    for _ in range(steps):
        torch_opt.zero_grad()
        inner_loss(leaves).backward()
        torch_opt.step()
    torch.testing.assert_close(theta_k, {k: v.detach() for k, v in leaves.items()}, rtol=0, atol=1e-12)

    if not uses_sqrt:
        return
    # The test is meaningful: the same optimizer with a plain torch.sqrt gives NaN meta-gradients here.
    monkeypatch.setattr(importlib.import_module(update_module or f"unroll.{name}"), "safe_sqrt", torch.sqrt)
    naive_theta_k, naive_meta = _meta_gradient(_make(name, options), theta0, inner_loss, outer_loss, steps)
    torch.testing.assert_close(naive_theta_k, theta_k, rtol=0, atol=0)
    assert any(torch.isnan(g).any() for g in naive_meta.values())


@pytest.mark.parametrize("case", ZERO_GRAD_OPTIONS, ids=_case_id)
def test_zero_gradient_entries_give_finite_meta_gradients(case: Tuple[str, Dict[str, Any]], mlp_params: Any,
                                                          mlp_forward: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_finite_meta_gradients(*case, mlp_params, mlp_forward, monkeypatch)
