"""Tests of ``checkpoint=N`` (binomial checkpointing: at most N stored states) and of constant steps recording
nothing (``stop_grad``, ``truncate``) when hyperparameters are tensors.

Every schedule must give the plain unroll's values and gradients (float64, 1e-10) to every kind of outer input:
tensors in ``args``, tensors closed over by ``inner_fn``, tensor hyperparameters, the initial params and state.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import unroll
from test_surrogate import DTYPE, OPTIMIZERS, assert_close, grads_of, leaf_copy, make_game, resampled_batches
from unroll import _schedule

ROOT = Path(__file__).resolve().parent.parent
K = 7  # odd, and long enough for every schedule below to recompute


# ---------------------------------------------------------------------------------------------------------------
# The schedule: revolve's optimum, within the budget
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def fewest_advances(steps: int, slots: int) -> float:
    """Brute force over every first stored state: the optimum the closed form and the plan must reach."""
    if steps == 1:
        return 0
    if slots == 0:
        return math.inf
    return min(m + fewest_advances(m, slots) + fewest_advances(steps - m, slots - 1) for m in range(1, steps))


def test_closed_form_and_plan_reach_the_brute_force_optimum_within_the_budget() -> None:
    for slots in range(1, 6):
        for steps in range(1, 45):
            assert _schedule.min_advances(steps, slots) == fewest_advances(steps, slots)
            schedule = _schedule.plan(steps, slots)
            assert schedule.steps == steps
            # Each step once forward, once more to record its graph, plus the optimal advances (the top level's
            # first pass advances for free: steps - 1 of them).
            assert _schedule.forward_steps(schedule) == steps + 1 + fewest_advances(steps, min(slots, steps))
            assert _schedule.most_stored(schedule) <= slots


def test_a_budget_of_k_minus_one_or_more_stores_every_state() -> None:
    for steps in (2, 5, 9):
        assert _schedule.plan(steps, steps - 1) == _schedule.plan(steps, 100)
        assert _schedule.forward_steps(_schedule.plan(steps, steps - 1)) == 2 * steps
        assert _schedule.stored_positions(_schedule.plan(steps, steps), steps - 1) == list(range(steps))


def test_long_plans_are_cheap_to_make_and_logarithmic_in_time() -> None:
    schedule = _schedule.plan(10_000, 14)
    assert _schedule.repetitions(10_000, 14) == 5  # comb(19, 14) = 11,628 >= 10,000
    assert _schedule.forward_steps(schedule) <= 10_000 * (1 + 5)


# ---------------------------------------------------------------------------------------------------------------
# A game whose gradients reach every kind of outer input
# ---------------------------------------------------------------------------------------------------------------


class Inputs:
    """The tiny float64 GAN of test_surrogate, plus a tensor closed over by inner_fn (a logit offset) and a tensor
    learning rate; ``wrt`` lists every tensor the outer gradient must reach."""

    def __init__(self, seed: int = 5) -> None:
        self.game = make_game(seed)
        self.game.real.requires_grad_()  # a tensor in args that the gradient must reach
        self.offset = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
        self.lr = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
        self.d_params = leaf_copy(self.game.d_params)
        self.calls = 0

    def inner(self, d: Dict[str, Tensor], g: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        self.calls += 1
        return self.game.d_loss(d, g, real, z) + self.offset * sum(p.square().sum() for p in d.values())

    def optimizer(self, name: str) -> unroll.Optimizer:
        if name == "adam-tensor-lr":
            return unroll.adam(self.lr, betas=(0.5, 0.999))
        if name == "sgd-tensor-lr":
            return unroll.sgd(self.lr, momentum=0.5)
        if name == "param_groups":
            names = list(self.d_params)
            return unroll.param_groups({n: (unroll.adam(self.lr) if i % 2 else unroll.sgd(0.1, momentum=0.9))
                                        for i, n in enumerate(names)})
        if name == "custom":
            return unroll.custom_optimizer(lambda p, g, b, t, lr: (p - lr * g / (1 + g.abs()), {}), name="soft_sign",
                                           elementwise=True, lr=self.lr)
        if name in OPTIMIZERS:
            return OPTIMIZERS[name]
        factories = {"adamw": lambda: unroll.adamw(self.lr), "adagrad": lambda: unroll.adagrad(self.lr),
                     "adamax": lambda: unroll.adamax(self.lr), "nadam": lambda: unroll.nadam(self.lr),
                     "radam": lambda: unroll.radam(self.lr), "rmsprop": lambda: unroll.rmsprop(self.lr)}
        return factories[name]()

    def state(self, opt: unroll.Optimizer) -> Dict[str, Any]:
        """A warm state (two committed steps) that requires grad, so gradients to the initial state are tested."""
        _, state = unroll.unrolled_params(self.game.d_loss, 2, True, optimizer=opt)(
            self.d_params, opt.init(self.d_params), *self.game.args)
        return unroll_tree_requires_grad(state)

    def wrt(self, state: Dict[str, Any]) -> List[Tensor]:
        buffers = [t for name, t in state.items() if name != "step" for t in t.values()]
        return [*self.game.g_params.values(), self.game.real, self.offset, self.lr, *self.d_params.values(),
                *buffers]


def unroll_tree_requires_grad(state: Dict[str, Any]) -> Dict[str, Any]:
    return {name: (value if name == "step" else {n: t.detach().clone().requires_grad_() for n, t in value.items()})
            for name, value in state.items()}


def value_and_grads(inputs: Inputs, opt: unroll.Optimizer, state: Dict[str, Any], **options: Any
                    ) -> Tuple[Tensor, List[Optional[Tensor]]]:
    game = inputs.game
    value = unroll.surrogate_loss(inputs.inner, options.pop("K", K), optimizer=opt, **options)(
        inputs.d_params, state, game.g_params, game.real, game.z)
    wrt = inputs.wrt(state)
    return value.detach(), list(torch.autograd.grad(value, wrt, allow_unused=True))


def assert_same_as_plain(opt_name: str, checkpoint: Any, seed: int = 5, **options: Any) -> None:
    inputs = Inputs(seed)
    opt = inputs.optimizer(opt_name)
    state = inputs.state(opt)
    expected = value_and_grads(inputs, opt, state, **options)
    got = value_and_grads(inputs, opt, state, checkpoint=checkpoint, **options)
    assert_close(got[0], expected[0])
    reached = 0
    for g, e in zip(got[1], expected[1]):
        assert (g is None) == (e is None)
        if e is not None:
            assert_close(g, e)
            reached += bool(e.abs().sum() > 0)
    assert reached >= 5  # the comparison is not between zeros


# ---------------------------------------------------------------------------------------------------------------
# checkpoint=N equals the plain unroll
# ---------------------------------------------------------------------------------------------------------------


ALL_OPTIMIZERS = ["sgd-tensor-lr", "adam-tensor-lr", "adam-amsgrad", "adamw", "rmsprop",
                  "rmsprop-centered-momentum", "adagrad", "adamax", "nadam", "radam", "param_groups", "custom"]


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
@pytest.mark.parametrize("checkpoint", [1, 2, True])
def test_every_optimizer_gives_the_plain_unrolls_value_and_gradients(optimizer: str, checkpoint: Any) -> None:
    assert_same_as_plain(optimizer, checkpoint)


@pytest.mark.parametrize("checkpoint", [1, 3, K - 1, K + 5])
@pytest.mark.parametrize("option", ["truncate", "transform_grads", "step_args", "average_over_steps", "outer_fn"])
def test_every_option_gives_the_plain_unrolls_value_and_gradients(option: str, checkpoint: int) -> None:
    inputs = Inputs(6)
    scale = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)  # closed over by transform_grads
    batches = resampled_batches(inputs.game, K)
    options: Dict[str, Any] = {
        "truncate": {"truncate": 4},
        "transform_grads": {"transform_grads": lambda grads, k: {n: g * scale ** (k + 1) for n, g in grads.items()}},
        "step_args": {"step_args": lambda k, g, real, z: (g, *batches[k])},
        "average_over_steps": {"average_over_steps": True, "outer_fn": inputs.game.ns_loss},
        "outer_fn": {"outer_fn": inputs.game.ns_loss},
    }[option]
    assert_same_as_plain("adam-tensor-lr", checkpoint, seed=6, **options)
    if option == "transform_grads":  # the closed-over scale gets the plain unroll's gradient too
        for ck in (False, checkpoint):
            value = unroll.surrogate_loss(inputs.inner, K, optimizer=inputs.optimizer("adam-tensor-lr"), checkpoint=ck,
                                          **options)(inputs.d_params, inputs.state(inputs.optimizer("adam-tensor-lr")),
                                                     *inputs.game.args)
            if ck is False:
                expected = torch.autograd.grad(value, scale)[0]
            else:
                assert_close(torch.autograd.grad(value, scale)[0], expected)


@pytest.mark.parametrize("stop_grad", [False, True])
def test_stop_grad_and_unrolled_params(stop_grad: bool) -> None:
    inputs = Inputs(7)
    opt = inputs.optimizer("adam-tensor-lr")
    state = inputs.state(opt)
    results = []
    for checkpoint in (False, 2):
        params, new_state = unroll.unrolled_params(inputs.inner, K, stop_grad, optimizer=opt, checkpoint=checkpoint)(
            inputs.d_params, state, *inputs.game.args)
        total = sum((p * p).sum() for p in params.values()) + sum(t.sum() for t in new_state["exp_avg"].values())
        grads = (torch.autograd.grad(total, inputs.wrt(state), allow_unused=True) if total.requires_grad else None)
        results.append((params, new_state, grads))
    assert_close(results[1][:2], results[0][:2])
    if stop_grad:
        assert results[0][2] is None and results[1][2] is None
    else:
        for g, e in zip(results[1][2], results[0][2]):
            assert (g is None and e is None) or torch.allclose(g, e, rtol=1e-10, atol=1e-12)


def test_buffers_are_updated_exactly_as_without_checkpointing() -> None:
    """A buffer that inner_fn both reads and updates in place: a rerun that started from the updated buffer, or
    updated it twice, would change the losses."""
    inputs = Inputs(8)
    counter = torch.zeros((), dtype=DTYPE)

    def inner(d: Dict[str, Tensor], g: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        d = dict(d)
        count = d.pop("count")
        loss = inputs.game.d_loss(d, g, real, z) * (1 + 0.1 * count)
        count.add_(1)
        return loss

    opt = inputs.optimizer("adam-tensor-lr")
    results = []
    for checkpoint in (False, 1, 3):
        value = unroll.surrogate_loss(inner, K, optimizer=opt, checkpoint=checkpoint)(
            inputs.d_params, opt.init(inputs.d_params), *inputs.game.args, buffers={"count": counter})
        results.append((value.detach(), grads_of(value, inputs.game.g_params)))
    assert counter.item() == 0  # the caller's buffer is untouched
    assert_close(results[1], results[0])
    assert_close(results[2], results[0])


def test_batchnorm_and_dropout_give_the_plain_unrolls_gradients() -> None:
    """Random draws in inner_fn are the same in every rerun (the generators are stored with each state)."""
    game = make_game(seed=9, batchnorm=True, d_hidden=(6,))
    buffers = dict(game.D.named_buffers())

    def inner(d: Dict[str, Tensor], g: Dict[str, Tensor], real: Tensor, z: Tensor) -> Tensor:
        return game.d_loss(d, g, F.dropout(real, 0.3), z)

    opt = unroll.adam(0.05)
    results = []
    for checkpoint in (False, 2):
        torch.manual_seed(0)
        value = unroll.surrogate_loss(inner, K, optimizer=opt, checkpoint=checkpoint)(
            game.d_params, opt.init(game.d_params), *game.args, buffers=buffers)
        results.append((value.detach(), grads_of(value, {**game.g_params, **game.d_params}), torch.rand(())))
    assert_close(results[1], results[0])  # including the generator's state after the call


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 12), slots=st.integers(1, 13))
def test_inner_fn_runs_as_often_as_the_optimal_schedule_says(steps: int, slots: int) -> None:
    inputs = Inputs(10)
    opt = inputs.optimizer("sgd-tensor-lr")
    value = unroll.surrogate_loss(inputs.inner, steps, optimizer=opt, checkpoint=slots,
                                  outer_fn=inputs.game.ns_loss)(inputs.d_params, opt.init(inputs.d_params),
                                                                *inputs.game.args)
    torch.autograd.grad(value, list(inputs.game.g_params.values()))
    assert inputs.calls == steps + 1 + fewest_advances(steps, min(slots, steps))


def test_gradients_can_be_taken_twice_with_retain_graph() -> None:
    inputs = Inputs(11)
    opt = inputs.optimizer("adam-tensor-lr")
    value = unroll.surrogate_loss(inputs.inner, K, optimizer=opt, checkpoint=2)(
        inputs.d_params, opt.init(inputs.d_params), *inputs.game.args)
    first = grads_of(value, inputs.game.g_params)
    assert_close(grads_of(value, inputs.game.g_params), first)


# ---------------------------------------------------------------------------------------------------------------
# Bad budgets and places where checkpointing cannot run
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, message", [(0, ValueError, "N >= 1"), (-3, ValueError, "N >= 1"),
                                                 (1.5, TypeError, "float"), ("3", TypeError, "str"),
                                                 (None, TypeError, "NoneType")])
def test_bad_budgets_are_refused_before_any_work(bad: Any, error: type, message: str) -> None:
    inputs = Inputs()
    for make in (unroll.surrogate_loss, unroll.unrolled_params):
        with pytest.raises(error, match=message):
            make(inputs.inner, K, optimizer=unroll.sgd(0.1), checkpoint=bad)
    assert inputs.calls == 0


def test_under_torch_func_transforms_checkpointing_is_refused_before_any_work() -> None:
    inputs = Inputs()
    opt = unroll.sgd(0.1)
    surrogate = unroll.surrogate_loss(inputs.inner, K, optimizer=opt, checkpoint=3)
    game = inputs.game
    with pytest.raises(RuntimeError, match="cannot run under torch.func"):
        torch.func.grad(lambda g: surrogate(inputs.d_params, opt.init(inputs.d_params), g, game.real, game.z))(
            {n: p.detach() for n, p in game.g_params.items()})
    assert inputs.calls == 0


def test_a_tensor_the_unroll_cannot_see_is_an_error_not_a_lost_gradient() -> None:
    inputs = Inputs()
    hidden = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)

    def inner(d: Dict[str, Tensor], *args: Any) -> Tensor:
        with torch._C.DisableTorchFunction():  # operations the unroll's watch cannot see
            scaled = d["0.weight"] * hidden
        return inputs.inner(d, *args) + scaled.square().sum()

    opt = unroll.sgd(0.1)
    value = unroll.surrogate_loss(inner, 3, optimizer=opt, checkpoint=1)(inputs.d_params, opt.init(inputs.d_params),
                                                                         *inputs.game.args)
    with pytest.raises(RuntimeError, match="did not see"):
        torch.autograd.grad(value, [hidden, *inputs.game.g_params.values()])


# ---------------------------------------------------------------------------------------------------------------
# Constant steps record nothing (stop_grad, truncate) with tensor hyperparameters
# ---------------------------------------------------------------------------------------------------------------


def test_stop_grad_and_truncate_zero_give_a_tensor_learning_rate_no_gradient() -> None:
    """The case a new user hit: theta^K is a constant, so nothing may reach lr (it used to get -4.88)."""
    lr = torch.tensor(0.1, requires_grad=True)
    opt = unroll.sgd(lr=lr)
    w = {"w": torch.ones(1)}
    for options in ({"stop_grad": True}, {"truncate": 0}):
        value = unroll.surrogate_loss(lambda p: (p["w"] ** 2).sum(), 3, optimizer=opt,
                                      outer_fn=lambda p: p["w"].sum(), **options)(w, opt.init(w))
        assert not value.requires_grad
    full = unroll.surrogate_loss(lambda p: (p["w"] ** 2).sum(), 3, optimizer=opt, outer_fn=lambda p: p["w"].sum())
    assert torch.autograd.grad(full(w, opt.init(w)), lr)[0].item() == pytest.approx(-3.84)


@pytest.mark.parametrize("checkpoint", [False, 2])
def test_truncate_gives_a_tensor_hyperparameter_only_the_last_steps_gradient(checkpoint: Any) -> None:
    """truncate=T equals: K - T steps with the learning rate as a constant, then T differentiated steps."""
    inputs = Inputs(12)
    game, T = inputs.game, 3
    opt = inputs.optimizer("adam-tensor-lr")
    start = opt.init(inputs.d_params)
    truncated = unroll.surrogate_loss(inputs.inner, K, optimizer=opt, truncate=T, checkpoint=checkpoint)(
        inputs.d_params, start, *game.args)
    constant_lr = unroll.adam(inputs.lr.detach(), betas=(0.5, 0.999))
    offset = inputs.offset
    inputs.offset = offset.detach()
    middle_params, middle_state = unroll.unrolled_params(inputs.inner, K - T, True, optimizer=constant_lr)(
        inputs.d_params, start, *game.args)
    inputs.offset = offset
    by_hand = unroll.surrogate_loss(inputs.inner, T, optimizer=opt)(middle_params, middle_state, *game.args)
    wrt = [inputs.lr, inputs.offset, *game.g_params.values()]
    assert_close(torch.autograd.grad(truncated, wrt), torch.autograd.grad(by_hand, wrt))


def graph_size(value: Tensor) -> int:
    seen, todo = set(), [value.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("checkpoint", [False, 2])
def test_constant_steps_record_no_graph_to_a_tensor_hyperparameter(checkpoint: Any) -> None:
    """The graph behind the value must not grow with the constant steps (it used to, until the cut)."""
    inputs = Inputs(13)
    opt = inputs.optimizer("adam-tensor-lr")
    sizes = [graph_size(unroll.surrogate_loss(inputs.inner, steps, optimizer=opt, truncate=2, checkpoint=checkpoint)(
        inputs.d_params, opt.init(inputs.d_params), *inputs.game.args)) for steps in (3, 12)]
    assert sizes[0] == sizes[1]


def test_checkpointed_graph_does_not_grow_with_k() -> None:
    inputs = Inputs(14)
    opt = inputs.optimizer("adam-tensor-lr")
    sizes = {}
    for steps in (4, 16):
        for checkpoint in (False, 3):
            surrogate = unroll.surrogate_loss(inputs.inner, steps, optimizer=opt, checkpoint=checkpoint)
            sizes[steps, checkpoint] = graph_size(surrogate(inputs.d_params, opt.init(inputs.d_params),
                                                            *inputs.game.args))
    assert sizes[(4, 3)] == sizes[(16, 3)]
    assert sizes[(16, False)] > 3 * sizes[(4, False)]  # the plain unroll's graph does grow


# ---------------------------------------------------------------------------------------------------------------
# Peak memory does not grow with K at a fixed N
# ---------------------------------------------------------------------------------------------------------------


PEAK_PROBE = textwrap.dedent("""
    import json, sys
    import torch, unroll
    from benchmarks.memory import peak_growth_bytes
    torch.set_num_threads(1)
    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    params = {n: p.detach() for n, p in D.named_parameters()}
    x = torch.randn(512, 8)
    w = torch.randn(8, requires_grad=True)

    def inner(p, x):
        return torch.func.functional_call(D, p, (x * w,)).square().mean()

    opt = unroll.adam(1e-3)
    def gradient(K, checkpoint):
        value = unroll.surrogate_loss(inner, K, optimizer=opt, checkpoint=checkpoint)(params, opt.init(params), x)
        return torch.autograd.grad(value, w)
    out = {}
    for checkpoint in (4, False):
        for K in (25, 100):
            out[f"{checkpoint},{K}"] = peak_growth_bytes(lambda: gradient(K, checkpoint),
                                                         lambda: gradient(2, checkpoint))
    print(json.dumps(out))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS needs Linux /proc")
def test_peak_memory_at_fixed_n_does_not_grow_with_k() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run([sys.executable, "-c", PEAK_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    # The probe can see growth: the plain unroll's peak grows about 4x from K = 25 to 100.
    assert peak["False,100"] > 2.5 * peak["False,25"] and peak["False,100"] > 20 * mib
    # At N = 4 it stays within a small factor (allocator noise), far below the plain unroll's.
    assert peak["4,100"] <= 1.5 * peak["4,25"] + 2 * mib
    assert peak["4,100"] < peak["False,100"] / 4
