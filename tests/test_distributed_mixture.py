"""``examples/gan/mixture.py`` data-parallel over two gloo processes gives the one-process run's metrics.

Each job forks two ranks that call ``mixture.main`` with the environment ``torchrun`` would set (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT): a 3-iteration run, then ``--resume`` to 6 iterations, must give the
records of one process run for 6 iterations at the same global batch and seeds (to float32 summation order), with
rank 0 alone holding the folder; a NaN in rank 1's shard only stops both ranks at the same iteration.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mixture
from unroll_examples.training import Trainer

WORLD = 2
FLAGS = ["--K", "2", "--eval-every", "3", "--seeds", "0-1", "--batch", "32", "--eval-samples", "500",
         "--no-progress", "--threads", "1"]
NAN_STEP = 2  # the iteration whose rank-1 shard is NaN in the divergence job


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, port: int, argv: List[str], result_dir: str, nan_on_rank_1: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo0" if sys.platform == "darwin" else "lo")
    if nan_on_rank_1 and rank == 1:
        draw = Trainer.draw_batch

        def draw_with_nan(self: Trainer) -> Dict[str, torch.Tensor]:
            batch = draw(self)
            if self.step + 1 == NAN_STEP:
                batch["x"] = torch.full_like(batch["x"], float("nan"))
            return batch

        Trainer.draw_batch = draw_with_nan  # this forked rank only
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = mixture.main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "stderr": stderr.getvalue()}))


def two_ranks(argv: List[str], result_dir: Path, nan_on_rank_1: bool = False) -> List[Dict[str, Any]]:
    result_dir.mkdir(parents=True, exist_ok=True)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        mp.start_processes(run_rank, args=(free_port(), argv, str(result_dir), nan_on_rank_1), nprocs=WORLD,
                           start_method=method)
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def records(out: Path) -> List[Dict[str, Any]]:
    return json.loads((out / "metrics.json").read_text())["records"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("mixture")
    assert "WORLD_SIZE" not in os.environ
    assert mixture.main([*FLAGS, "--steps", "6", "--out", str(root / "one")]) == 0
    first = two_ranks([*FLAGS, "--steps", "3", "--out", str(root / "two")], root / "first")
    first_records = records(root / "two")
    resumed = two_ranks([*FLAGS, "--steps", "6", "--resume", "--out", str(root / "two")], root / "resumed")
    diverged = two_ranks([*FLAGS, "--steps", "6", "--out", str(root / "nan")], root / "diverged", nan_on_rank_1=True)
    return {"root": root, "first": first, "first_records": first_records, "resumed": resumed,
            "diverged": diverged}


def assert_records_close(actual: List[Dict[str, Any]], expected: List[Dict[str, Any]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert list(got) == list(want)
        for key, value in want.items():
            if value is None:  # strict JSON writes a missing value (the losses before the first step) as null
                assert got[key] is None, (key, got, want)
            else:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, got, want)


def test_two_ranks_resumed_match_one_process(runs: Dict[str, Any]) -> None:
    assert [r["code"] for r in runs["first"] + runs["resumed"]] == [0] * 2 * WORLD
    one = records(runs["root"] / "one")
    assert_records_close(runs["first_records"], one[:len(runs["first_records"])])  # steps 0 and 3
    assert_records_close(records(runs["root"] / "two"), one)  # steps 0, 3 and 6 after --resume
    assert json.loads((runs["root"] / "two" / "metrics.json").read_text())["status"] == "done"


def test_rank_0_alone_holds_the_folder(runs: Dict[str, Any]) -> None:
    # Had rank 1 taken the lock too, one of the two would have been refused (exit code 2, "in use").
    assert [r["code"] for r in runs["first"]] == [0] * WORLD
    assert all("in use by another run" not in r["stderr"] for r in runs["first"])


def test_nan_on_one_rank_stops_every_rank_at_that_iteration(runs: Dict[str, Any]) -> None:
    assert [r["code"] for r in runs["diverged"]] == [3] * WORLD
    for result in runs["diverged"]:
        assert f"at iteration {NAN_STEP} for seed 0" in result["stderr"]
    meta = json.loads((runs["root"] / "nan" / "metrics.json").read_text())
    assert meta["status"] == "diverged" and meta["diverged"]["step"] == NAN_STEP


def test_batch_that_does_not_split_is_refused_before_joining(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert mixture.main([*FLAGS, "--batch", "33", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--batch 33 does not split evenly over 2 processes" in capsys.readouterr().err
    assert not dist.is_initialized() and not (tmp_path / "x").exists()
