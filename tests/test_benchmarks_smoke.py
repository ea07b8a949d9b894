"""Smoke test of the benchmark suite (benchmarks/): its quick mode runs, and the methods' gradients agree.

higher and torchopt are optional (the ``bench`` extra); their parts are skipped when they are not installed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from benchmarks import memory, vmap_seeds
from benchmarks.methods import (
    CHECKPOINT_METHOD,
    checkpoint_unavailable,
    describe,
    make,
    make_unroll,
    parse_method,
    unavailable,
    unroll_method,
    warm_up,
)
from benchmarks.models import make_problem, to_device
from benchmarks.unrolled_gradient import (
    QUICK,
    SEEDS_ON_CUDA,
    compare,
    device_unavailable,
    main,
    render_markdown,
    run_suite,
    truncation_methods,
)

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # The machine may be shared: extra OpenMP threads would only spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_results() -> Dict[str, Any]:
    config = replace(QUICK, methods=("unroll", "first_order"), memory=False)
    return run_suite(config, log=lambda message: None)


def test_quick_mode_times_every_method_model_and_k(quick_results: Dict[str, Any]) -> None:
    timed = {(r["model"], r["K"], r["method"]) for r in quick_results["timings"]}
    expected = {(m, K, method) for m in QUICK.models for K in QUICK.ks for method in ("unroll", "first_order")}
    assert timed == expected
    assert all(r["median_ms"] > 0 and len(r["times_ms"]) == QUICK.reps_for(r["model"])
               for r in quick_results["timings"])


def test_first_order_gradient_equals_stop_grad_unroll(quick_results: Dict[str, Any]) -> None:
    checks = quick_results["checks"]
    assert {(c["model"], c["K"]) for c in checks} == {(m, K) for m in QUICK.models for K in QUICK.ks}
    for check in checks:
        assert check["method"] == "first_order" and not check["nan"]
        assert check["max_rel"] <= TOLERANCE, check


def test_page_shows_command_targets_and_checkpoint_row(quick_results: Dict[str, Any]) -> None:
    page = render_markdown(quick_results, "python -m benchmarks.unrolled_gradient --quick")
    assert page.count("python -m benchmarks.unrolled_gradient --quick") == 1
    assert "unroll ≤ 3.2× first-order" not in page  # K = 10 is not in the quick run
    assert "checkpointed unroll" in page
    assert "## mixture: median time per gradient" in page and "## conv: median time per gradient" in page
    assert "## N seeds in one process" in page and "mixture seeds in one process (vmap)" in page
    small_batch = QUICK.seeds_small_batch.batch
    assert f"| {small_batch} | vmap:" in page and f"| {QUICK.seeds.batch} | vmap:" in page


def test_truncation_section_times_every_variant_and_checks_gradients(quick_results: Dict[str, Any]) -> None:
    truncation = quick_results["truncation"]
    reason = unavailable(unroll_method(truncate=1, checkpoint=True))
    if reason is not None:
        assert truncation == {"skipped": reason}
        pytest.skip(reason)
    expected = {(m, K, method) for m in QUICK.models for K in QUICK.truncation_ks for method in truncation_methods(K)}
    assert {(r["model"], r["K"], r["method"]) for r in truncation["rows"]} == expected
    reps = dict(QUICK.truncation_reps)
    assert all(len(r["times_ms"]) == reps[r["model"]] and r["median_ms"] > 0 for r in truncation["rows"])
    # truncate=K is the full gradient; checkpointing (alone or with truncate=K/2) changes no gradient.
    assert len(truncation["checks"]) == 3 * len(QUICK.models) * len(QUICK.truncation_ks)
    assert all(c["ok"] and c["max_rel"] <= QUICK.checkpoint_tolerance for c in truncation["checks"])
    for row in truncation["rows"]:
        if parse_method(row["method"])[1].get("truncate") == 1 < row["K"]:
            # Guards the checks: truncating the unroll must change the gradient, or "equal" would be vacuous.
            assert row["vs_full"]["max_rel"] > 100 * QUICK.checkpoint_tolerance, row


def test_page_shows_the_truncation_section(quick_results: Dict[str, Any]) -> None:
    page = render_markdown(quick_results, "python -m benchmarks.unrolled_gradient --quick")
    K = max(QUICK.truncation_ks)
    assert "## Truncated unrolls" in page and "### conv" in page
    assert f"| {K} | truncate={K} (full gradient) | " in page
    assert f"| {K} | truncate={K // 2}, checkpoint=True | " in page


def test_method_names_carry_unroll_options() -> None:
    name = unroll_method(truncate=10, checkpoint=True)
    assert name == "unroll:truncate=10:checkpoint" and parse_method(name) == ("unroll", {"truncate": 10,
                                                                                        "checkpoint": True})
    assert parse_method("higher") == ("higher", {}) and describe(name) == "truncate=10, checkpoint=True"
    assert parse_method(unroll_method(checkpoint=8)) == ("unroll", {"checkpoint": 8})
    assert describe("unroll:checkpoint=8") == "checkpoint=8"
    assert warm_up(name) == ("unroll:truncate=1:checkpoint", 2) and warm_up("torchopt") == ("torchopt", 1)
    for bad, message in [("unroll:checkpoint:truncate=3", "write it as 'unroll:truncate=3:checkpoint'"),
                         ("unroll:truncate=x", "truncate needs an integer"), ("higher:checkpoint", "only unroll"),
                         ("unroll:foo", "unknown option 'foo'"), ("unroll:checkpoint=0", "N >= 1"),
                         ("unroll:truncate=2:truncate=3", "given twice"), ("sgd", "unknown method")]:
        with pytest.raises(ValueError, match=message):
            parse_method(bad)


def test_truncated_method_is_built_with_its_options() -> None:
    problem = make_problem("mixture")
    truncated = make(unroll_method(truncate=1), problem, 3)()
    assert compare(truncated, make_unroll(problem, 3, truncate=1)())["max_abs"] == 0
    assert compare(truncated, make_unroll(problem, 3)())["max_rel"] > 1e-4


def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    reason = device_unavailable("cuda")
    assert reason is not None and "torch.cuda.is_available() is False" in reason
    with pytest.raises(SystemExit):  # argparse's error, before any work
        main(["--device", "cuda", "--quick"])
    with pytest.raises(ValueError, match="--device cuda needs a GPU"):
        run_suite(replace(QUICK, device="cuda"), log=lambda message: None)


def test_page_of_a_cuda_run_says_how_it_measured(quick_results: Dict[str, Any]) -> None:
    # Rendering is device-independent code; only its labels and notes change (CUDA itself cannot be run here).
    cuda = {**quick_results, "config": {**quick_results["config"], "device": "cuda"}, "seeds": None,
            "seeds_small_batch": None, "seeds_skipped": SEEDS_ON_CUDA,
            "machine": {**quick_results["machine"], "gpu": "NVIDIA H100 (CUDA 12.4)"}}
    page = render_markdown(cuda, "python -m benchmarks.unrolled_gradient --device cuda --quick")
    assert "GPU NVIDIA H100 (CUDA 12.4)" in page and "## On CUDA" in page and "torch.cuda.synchronize()" in page
    assert "peak CUDA memory growth MiB" in page and "RSS growth MiB" not in page
    assert f"Not measured on cuda: {SEEDS_ON_CUDA}" in page and "not measured on cuda (CPU only)" in page


def test_moving_a_problem_keeps_its_optimizer_state() -> None:
    # to_device moves modules in place and the Adam state by torch.optim's rule; on the CPU it must change nothing.
    problem = make_problem("mixture")
    moved = to_device(make_problem("mixture"), "cpu")
    assert set(moved.d_optimizer.state) == set(moved.discriminator.parameters())
    assert compare(make("unroll", moved, 2)(), make("unroll", problem, 2)())["max_abs"] == 0
    assert compare(make("first_order", moved, 2)(), make("first_order", problem, 2)())["max_abs"] == 0


def test_mixture_problem_is_built_from_the_experiments_app_a_networks() -> None:
    # One definition of App. A's networks: the benchmark's modules hold what init_generator and init_discriminator
    # draw from the seed, and compute generator_forward and discriminator_forward.
    from unroll_examples.models import discriminator_forward, generator_forward, init_discriminator, init_generator

    problem = make_problem("mixture", seed=3)
    rng = torch.Generator().manual_seed(3)
    g_params, d_params = init_generator(rng), init_discriminator(rng)
    for module, params in ((problem.generator, g_params), (problem.discriminator, d_params)):
        held = dict(module.named_parameters())
        assert held.keys() == params.keys() and all(torch.equal(held[n], t) for n, t in params.items())
    fake = problem.generator(problem.noise)
    assert torch.equal(fake, generator_forward(g_params, problem.noise))
    assert torch.equal(problem.discriminator(fake), discriminator_forward(d_params, fake))


def test_vmap_seeds_trains_the_same_parameters_as_separate_runs(quick_results: Dict[str, Any]) -> None:
    seeds = quick_results["seeds"]
    assert all(len(ts) == vmap_seeds.QUICK_SEEDS.reps and min(ts) > 0 for ts in seeds["times_s"].values())
    # A one-seed Trainer is built to give exactly the numbers of its seed in a vmapped batch; without vmap,
    # other reduction kernels change the last bits only.
    assert seeds["max_abs_diff"]["separate_trainer"] == 0
    assert seeds["max_abs_diff"]["separate"] <= 1e-5
    assert seeds["ok"] is None  # the target is for N = 10 seeds, not the quick run's 2
    small = quick_results["seeds_small_batch"]
    assert small["config"]["batch"] == QUICK.seeds_small_batch.batch != seeds["config"]["batch"]
    assert small["max_abs_diff"]["separate_trainer"] == 0 and small["max_abs_diff"]["separate"] <= 1e-5


def test_vmap_seeds_runs_really_train() -> None:
    # Guards the comparison above: equal parameters must not come from runs that leave them untouched.
    one, two = (vmap_seeds.runners(replace(vmap_seeds.QUICK_SEEDS, iterations=n))["vmap"]() for n in (1, 2))
    assert len(one) == vmap_seeds.QUICK_SEEDS.seeds
    assert all(not torch.equal(a[name], b[name]) for a, b in zip(one, two) for name in a)


def test_unrolled_gradient_differs_from_first_order() -> None:
    # Guards the comparison itself: the second term of Eq. 12 must be visible, or agreement would be vacuous.
    problem = make_problem("mixture")
    result = compare(make("unroll", problem, 2)(), make("first_order", problem, 2)())
    assert result["max_rel"] > 100 * TOLERANCE


def test_peak_growth_sees_a_known_allocation() -> None:
    reason = memory.supported()
    if reason is not None:
        pytest.skip(f"peak RSS cannot be measured here: {reason}")
    size = 64 * 2 ** 20  # above glibc's largest mmap threshold, so it is returned to the kernel when freed

    def allocate() -> int:
        return int(torch.ones(size // 4).sum())

    growth = memory.peak_growth_bytes(allocate, warm_up=lambda: None)
    assert 0.9 * size <= growth <= 1.5 * size


def test_memory_probe_subprocess_grows_with_k() -> None:
    reason = memory.supported()
    if reason is not None:
        pytest.skip(f"peak RSS cannot be measured here: {reason}")
    peaks = memory.measure(["mixture"], "unroll", [1, 4], seed=0)["mixture"]
    # Each unrolled step keeps its activations and Adam intermediates for the backward pass.
    assert 0 < peaks[1] < peaks[4]
    if unavailable(unroll_method(truncate=1)) is None:
        # A method name with options reaches the subprocess intact: truncate=1 keeps one step, whatever K.
        truncated = memory.measure(["mixture"], unroll_method(truncate=1), [1, 8], seed=0)["mixture"]
        assert 0 < truncated[8] < 1.5 * truncated[1] < peaks[4]


def test_checkpoint_method_matches_plain_unroll() -> None:
    reason = checkpoint_unavailable()
    if reason is not None:
        pytest.skip(reason)
    problem = make_problem("mixture")
    result = compare(make(CHECKPOINT_METHOD, problem, 3)(), make_unroll(problem, 3)())
    assert not result["nan"] and result["max_rel"] <= 1e-6, result


@pytest.mark.parametrize("method", ["higher", "torchopt"])
def test_optional_method_matches_unroll(method: str) -> None:
    pytest.importorskip(method, reason=f"{method} is an optional benchmark dependency (pip install -e .[bench])")
    # The conv model is compared in the suite's own side-check; the mixture keeps this test fast.
    problem = make_problem("mixture")
    result = compare(make(method, problem, 3)(), make_unroll(problem, 3)())
    assert not result["nan"]
    assert result["max_rel"] <= TOLERANCE, result


def test_long_horizon_page_extrapolates_skips_and_states_targets(tmp_path: Path) -> None:
    from benchmarks import long_horizon

    def cell(seconds: float, mib: float) -> Dict[str, Any]:
        return {"seconds": [seconds], "peak_bytes": int(mib * 2 ** 20)}

    results = {
        "device": "cpu", "command": "python -m benchmarks.long_horizon ...", "state_bytes": {"conv": 3 * 2 ** 20},
        "machine": {"cpu": "test", "cpus": 2, "gpu": None, "torch": "x", "date": "today", "load_average": [0, 0, 0]},
        "cells": {"conv": {"unroll": {"10": cell(1, 100), "100": cell(10, 1000)},
                           "unroll:checkpoint": {"10": cell(1, 30), "100": cell(10, 60), "1000": cell(100, 320)},
                           "unroll:checkpoint=8": {"10": cell(1, 30), "100": cell(12, 31), "1000": cell(140, 31)}}},
    }
    guess = long_horizon.extrapolated(results["cells"], "conv", "unroll", 1000)
    assert guess is not None and guess["peak_bytes"] == 10_000 * 2 ** 20 and guess["from"] == [10, 100]
    results["cells"]["conv"]["unroll"]["1000"] = {"skipped": guess}
    page = long_horizon.render(results, None)
    assert "| 1,000 | plain unroll (checkpoint=False) | ~100 (not run) | | ~10,000.0 (not run) | |" in page
    assert "| 1,000 | checkpoint=8 | 140.00 | 1.40× | 31.0 | 0.097× |" in page
    assert "checkpoint=8: memory 0.097× and time 1.40× checkpoint=True's" in page and "): met." in page
    assert "floor" in page


def test_long_horizon_probe_measures_one_gradient() -> None:
    from benchmarks import long_horizon

    if memory.supported("cpu") is not None:
        pytest.skip(f"peak memory cannot be measured here: {memory.supported('cpu')}")
    measured = long_horizon.probe("mixture", unroll_method(checkpoint=2), 3, 2, "cpu")
    assert len(measured["seconds"]) == 2 and all(s > 0 for s in measured["seconds"])
    assert measured["peak_bytes"] >= 0
