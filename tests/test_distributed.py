"""Tests of ``unroll.distributed``: two gloo processes on CPU, each with half of the batch, against one process.

One job starts the two ranks once (``torch.multiprocessing``, rendezvous through a file, loopback only), runs
every case and saves each rank's results with ``torch.save``; the tests compare them with the single-process
computation on the whole batch, in this process. The game is the small float64 GAN of ``test_surrogate.py``.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import unroll
from test_surrogate import Game, Params, assert_close, assert_trees_equal, leaf_copy, make_game, stack_trees
from unroll.distributed import all_reduce_grads_, all_reduce_mean, check_same_shapes

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
K = 5
SEED = 3
WARM_STEPS = 3  # committed D steps before the unroll: Adam's state is not fresh
CASES: Dict[str, Dict[str, Any]] = {
    "full": {},
    "stop_grad": {"stop_grad": True},
    "checkpoint": {"checkpoint": True},
}


def game_and_optimizer() -> Tuple[Game, unroll.Optimizer]:
    return make_game(SEED, batch=8, g_hidden=(5,), d_hidden=(6,)), unroll.adam(0.05, betas=(0.5, 0.999))


def shard(batch: Tensor, rank: int) -> Tensor:
    return batch.chunk(WORLD)[rank]


def d_loss(game: Game) -> Callable[..., Tensor]:
    """D's BCE on (real, fake), batch means: the mean of equal shards' losses is the whole batch's loss."""
    def loss(d_params: Params, real: Tensor, fake: Tensor) -> Tensor:
        logits = game.logits(d_params, torch.cat([real, fake]))
        return F.softplus(-logits[: len(real)]).mean() + F.softplus(logits[len(real):]).mean()
    return loss


def warm_start(game: Game, opt: unroll.Optimizer, real: Tensor, z: Tensor, transform: Any) -> Tuple[Params, Dict]:
    """D's params and Adam state after ``WARM_STEPS`` committed steps against G's samples."""
    step = unroll.train_step(d_loss(game), optimizer=opt, transform_grads=transform)
    d_params, state = game.d_params, opt.init(game.d_params)
    for _ in range(WARM_STEPS):
        d_params, state, _ = step(d_params, state, real, game.fake(game.g_params, z).detach())
    return d_params, state


def generator_grad(game: Game, opt: unroll.Optimizer, real: Tensor, z: Tensor, d_params: Params, state: Dict,
                   transform: Any, **options: Any) -> Tuple[Tensor, Params]:
    """The K-step surrogate (zero-sum) and G's gradient of it by ``backward`` (not yet averaged over ranks)."""
    g_params = leaf_copy(game.g_params)
    surrogate = unroll.surrogate_loss(d_loss(game), K, optimizer=opt, transform_grads=transform, **options)
    value = surrogate(d_params, state, real, game.fake(g_params, z))
    value.backward()
    return value.detach(), g_params


def unrolled_for_two_seeds(game: Game, opt: unroll.Optimizer, real: Tensor, z: Tensor, transform: Any) -> Any:
    """theta^K and state^K of two discriminators at once under ``torch.func.vmap``."""
    d_params = stack_trees([game.d_params, {name: 1.1 * p for name, p in game.d_params.items()}])
    states = stack_trees([opt.init(game.d_params)] * 2)
    unrolled = unroll.unrolled_params(d_loss(game), K, optimizer=opt, transform_grads=transform)
    fake = game.fake(game.g_params, z)
    return torch.func.vmap(lambda d, state: unrolled(d, state, real, fake))(d_params, states)


def grads(params: Params) -> Params:
    return {name: p.grad for name, p in params.items()}


def error_of(call: Callable[[], Any]) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001  (recorded and checked by the tests)
        return f"{type(error).__name__}: {error}"
    return "no error"


# ---------------------------------------------------------------------------------------------------------------
# What each rank runs
# ---------------------------------------------------------------------------------------------------------------


def parity_cases(rank: int) -> Dict[str, Any]:
    game, opt = game_and_optimizer()
    real, z = shard(game.real, rank), shard(game.z, rank)
    mean = all_reduce_mean()
    d_params, state = warm_start(game, opt, real, z, mean)
    results: Dict[str, Any] = {"warm": (d_params, state)}
    for name, options in CASES.items():
        value, g_params = generator_grad(game, opt, real, z, d_params, state, mean, **options)
        all_reduce_grads_(g_params)
        results[name] = (value, grads(g_params))
    unrolled = unroll.unrolled_params(d_loss(game), K, optimizer=opt, transform_grads=mean)
    results["theta_K"] = unrolled(d_params, state, real, game.fake(game.g_params, z))
    # The naive data-parallel unroll: each rank unrolls D on its own shard; only G's gradient is averaged.
    _, g_params = generator_grad(game, opt, real, z, d_params, state, None)
    all_reduce_grads_(g_params)
    results["naive"] = grads(g_params)
    # DistributedDataParallel on the generator instead of all_reduce_grads_ (backward without create_graph).
    G = DistributedDataParallel(game.G)
    surrogate = unroll.surrogate_loss(d_loss(game), K, optimizer=opt, transform_grads=mean)
    surrogate(d_params, state, real, G(z)).backward()
    results["ddp"] = {name: p.grad for name, p in game.G.named_parameters()}
    # torch.func.grad of the surrogate, averaged with the same (differentiable) mean.
    g_grad = torch.func.grad(lambda g: surrogate(d_params, state, real, game.fake(g, z)))(game.g_params)
    results["func_grad"] = mean(g_grad)
    results["vmap"] = unrolled_for_two_seeds(game, opt, real, z, mean)
    return results


def error_cases(rank: int) -> Dict[str, Any]:
    game, opt = game_and_optimizer()
    real, z = shard(game.real, rank), shard(game.z, rank)
    ones = torch.ones(3, dtype=torch.float64)
    results = {
        "param shapes": error_of(lambda: all_reduce_mean()({"w": torch.ones(3 + rank)}, 0)),
        "param names": error_of(lambda: all_reduce_mean()({"w" if rank == 0 else "v": ones}, 0)),
        "batch shapes": error_of(lambda: check_same_shapes((real[: 4 - rank], z))),
        "equal batch": error_of(lambda: check_same_shapes((real, z))),
    }
    # A NaN in rank 0's data only: the averaged gradient is NaN on both ranks, and both raise at the same step.
    nan_real = torch.full_like(real, float("nan")) if rank == 0 else real
    step = unroll.train_step(d_loss(game), optimizer=opt, transform_grads=all_reduce_mean())
    fake = game.fake(game.g_params, z).detach()
    results["nan on rank 0"] = error_of(lambda: step(game.d_params, opt.init(game.d_params), nan_real, fake))
    # .grad None on some ranks counts as zero; None on every rank stays None.
    params = {name: torch.zeros(2, dtype=torch.float64, requires_grad=True) for name in ("both", "rank 1", "none")}
    params["both"].grad = torch.full((2,), 1.0 + 2 * rank, dtype=torch.float64)
    if rank == 1:
        params["rank 1"].grad = torch.full((2,), 4.0, dtype=torch.float64)
    all_reduce_grads_(params)
    results["grads None"] = {name: "None" if p.grad is None else p.grad for name, p in params.items()}
    return results


def collective_counts(rank: int) -> Dict[str, Any]:
    """How many all-reduces one generator step makes (the surrogate's backward and G's average), per option."""
    game, opt = game_and_optimizer()
    real, z = shard(game.real, rank), shard(game.z, rank)
    mean = all_reduce_mean()
    d_params, state = warm_start(game, opt, real, z, mean)
    counts, all_reduce = {}, dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted  # this rank's process only
    try:
        for name, options in {**CASES, "truncate=2": {"truncate": 2},
                               "truncate=2, checkpoint": {"truncate": 2, "checkpoint": True}}.items():
            counts[name] = 0
            _, g_params = generator_grad(game, opt, real, z, d_params, state, mean, **options)
            all_reduce_grads_(g_params)
    finally:
        dist.all_reduce = all_reduce
    return counts


def run_rank(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # first, before any parallel region (the machine is shared; safe after fork)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a hang becomes an error
    try:
        results = {"parity": parity_cases(rank), "errors": error_cases(rank), "counts": collective_counts(rank)}
        dist.barrier()  # every rank got through every case: no rank was left waiting in a collective
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Every rank's results, from one two-process job."""
    out_dir = tmp_path_factory.mktemp("distributed")
    # The first checkpoint call imports torch._dynamo (seconds): once here, so that forked ranks inherit it.
    torch.utils.checkpoint.checkpoint(torch.sin, torch.zeros(1, requires_grad=True), use_reentrant=False)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork in a threaded process; the ranks set one thread before any torch op,
        # as DataLoader workers do.
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        mp.start_processes(run_rank, args=(str(out_dir / "store"), str(out_dir)), nprocs=WORLD,
                           start_method=method)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


# ---------------------------------------------------------------------------------------------------------------
# One process on the whole batch
# ---------------------------------------------------------------------------------------------------------------


def one_process(name: str) -> Any:
    game, opt = game_and_optimizer()
    d_params, state = warm_start(game, opt, game.real, game.z, None)
    if name == "warm":
        return d_params, state
    if name == "vmap":
        return unrolled_for_two_seeds(game, opt, game.real, game.z, None)
    if name == "theta_K":
        unrolled = unroll.unrolled_params(d_loss(game), K, optimizer=opt)
        return unrolled(d_params, state, game.real, game.fake(game.g_params, game.z))
    value, g_params = generator_grad(game, opt, game.real, game.z, d_params, state, None, **CASES.get(name, {}))
    return value, grads(g_params)


def assert_matches(actual: Any, expected: Any) -> None:
    """The issue's tolerance, 1e-6 (float64 reaches ~1e-16 here: only summation order differs)."""
    assert_close(actual, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_committed_steps_match_one_process(ranks: list) -> None:
    for results in ranks:
        assert_matches(results["parity"]["warm"], one_process("warm"))


@pytest.mark.parametrize("case", list(CASES))
def test_generator_gradient_matches_one_process(ranks: list, case: str) -> None:
    value, g_grad = one_process(case)
    for results in ranks:
        assert_matches(results["parity"][case][1], g_grad)
    # Equal shards: the mean of the ranks' surrogate values is the whole batch's value.
    assert_matches(torch.stack([results["parity"][case][0] for results in ranks]).mean(), value)


@pytest.mark.parametrize("case", ["theta_K", "vmap"])
def test_unrolled_params_are_the_one_process_params_on_every_rank(ranks: list, case: str) -> None:
    expected = one_process(case)
    for results in ranks:
        assert_matches(results["parity"][case], expected)
    assert_trees_equal(ranks[0]["parity"][case], ranks[1]["parity"][case])  # the same bits on every rank


def test_ddp_generator_and_func_grad_match_one_process(ranks: list) -> None:
    _, g_grad = one_process("full")
    for results in ranks:
        assert_matches(results["parity"]["ddp"], g_grad)
        assert_matches(results["parity"]["func_grad"], g_grad)


def test_naive_unroll_without_all_reduce_differs(ranks: list) -> None:
    _, g_grad = one_process("full")
    for results in ranks:
        with pytest.raises(AssertionError):
            assert_matches(results["parity"]["naive"], g_grad)


@pytest.mark.parametrize("case", ["param shapes", "param names", "batch shapes"])
def test_mismatch_across_ranks_raises_on_every_rank(ranks: list, case: str) -> None:
    for results in ranks:
        message = results["errors"][case]
        assert message.startswith("ValueError") and "differs across ranks" in message
        assert "rank 0:" in message and "rank 1:" in message


def test_equal_batches_pass_the_shape_check(ranks: list) -> None:
    assert [results["errors"]["equal batch"] for results in ranks] == ["no error"] * WORLD


def test_nan_on_one_rank_raises_on_every_rank(ranks: list) -> None:
    for results in ranks:
        message = results["errors"]["nan on rank 0"]
        assert message.startswith("FloatingPointError") and "unrolled step 0" in message


def test_all_reduce_grads_counts_none_as_zero(ranks: list) -> None:
    for results in ranks:
        averaged = results["errors"]["grads None"]
        assert_close(averaged["both"], torch.full((2,), 2.0, dtype=torch.float64))
        assert_close(averaged["rank 1"], torch.full((2,), 2.0, dtype=torch.float64))
        assert averaged["none"] == "None"


def test_collectives_per_generator_step(ranks: list) -> None:
    """K forward all-reduces, K backward (T with truncate=T, none with stop_grad), K more recomputed with
    checkpoint=True, and one for G's gradient: the counts of docs/distributed.md."""
    expected = {"full": 2 * K + 1, "stop_grad": K + 1, "checkpoint": 3 * K + 1, "truncate=2": K + 2 + 1,
                "truncate=2, checkpoint": K + 2 * 2 + 1}
    assert [results["counts"] for results in ranks] == [expected] * WORLD


def test_without_process_group_raises_before_any_work() -> None:
    assert not dist.is_initialized()
    params = {"w": torch.zeros(2, requires_grad=True)}
    calls: Dict[str, Callable[[], Any]] = {
        "all_reduce_mean": all_reduce_mean,
        "all_reduce_grads_": lambda: all_reduce_grads_(params),
        "check_same_shapes": lambda: check_same_shapes(torch.zeros(2)),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"unroll\.distributed\.{name} needs an initialised process group"):
            call()


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="check_finite must be a bool"):
        all_reduce_mean(check_finite="yes")  # type: ignore[arg-type]
