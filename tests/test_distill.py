"""examples/distill/distill.py (dataset distillation) on a tiny setting: it runs end to end with finite metrics, the
same seed gives the same numbers, a stopped run resumed gives the numbers of an uninterrupted one, bad flags are
refused with exit code 2; and its meta-gradient (pixels and per-step learning rates) matches float64 finite
differences, with and without checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import distill
from unroll_examples import mnist_data as md

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--K", "4", "--steps", "4", "--limit", "100", "--outer-batch", "16", "--eval-seeds", "2",
        "--checkpoint", "2", "--checkpoint-every", "2", "--monitor-every", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def mnist_present() -> None:
    if not md.has_split("test"):
        pytest.skip(md.how_to_get("test"))


def numbers(out: Path) -> Dict[str, Any]:
    """What a run computed (not how long it took)."""
    metrics = json.loads((out / "metrics.json").read_text())
    return {key: metrics[key] for key in ("rows", "learned_lrs", "outer_loss_first_last_50")}


@pytest.mark.usefixtures("mnist_present")
def test_runs_end_to_end_with_finite_metrics(tmp_path: Path) -> None:
    assert distill.main(TINY + ["--init", "random", "--window", "2", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["data"] for row in metrics["rows"]] == ["distilled", "random real", "class means"]
    values = [v for row in metrics["rows"] for v in row["random_init"]] + metrics["learned_lrs"] \
        + [metrics["seconds_per_outer_step"]] + metrics["outer_loss_first_last_50"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
    assert all(len(row["random_init"]) == 2 and "fixed_init" not in row for row in metrics["rows"])
    assert len(metrics["learned_lrs"]) == 4 and "distilled | learned per step" in metrics["table"]
    assert (tmp_path / "distilled.png").stat().st_size > 1000 and (tmp_path / "table.md").is_file()


@pytest.mark.usefixtures("mnist_present")
def test_same_seed_same_numbers_and_a_stopped_run_resumes_exactly(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole, again, stopped = tmp_path / "whole", tmp_path / "again", tmp_path / "stopped"
    assert distill.main(TINY + ["--out", str(whole)]) == 0
    assert distill.main(TINY + ["--out", str(again)]) == 0
    assert numbers(whole) == numbers(again)
    assert all(len(row["fixed_init"]) >= 1 for row in numbers(whole)["rows"])

    # Stop during outer step 4 (0-based 3): the checkpoint holds step 2, so step 3 is redone after the resume.
    real_step = distill.outer_step

    def stop_at_3(cfg: distill.Config, dist: distill.Distillation, data: distill.Data, step: int) -> float:
        if step == 3:
            raise KeyboardInterrupt
        return real_step(cfg, dist, data, step)

    monkeypatch.setattr(distill, "outer_step", stop_at_3)
    try:
        code = distill.main(TINY + ["--out", str(stopped)])
    except KeyboardInterrupt:
        code = 130
    assert code == 130 and not (stopped / "metrics.json").exists()
    monkeypatch.setattr(distill, "outer_step", real_step)
    assert distill.main(TINY + ["--out", str(stopped), "--resume"]) == 0
    assert numbers(stopped) == numbers(whole)
    assert json.loads((stopped / "metrics.json").read_text())["resumed_at"] == 2


@pytest.mark.usefixtures("mnist_present")
def test_resume_refuses_other_settings_and_a_folder_without_a_run(tmp_path: Path, capsys: Any) -> None:
    assert distill.main(TINY + ["--steps", "1", "--eval-seeds", "1", "--out", str(tmp_path / "a")]) == 0
    assert distill.main(TINY + ["--steps", "1", "--eval-seeds", "1", "--ipc", "2", "--resume",
                                "--out", str(tmp_path / "a")]) == 2
    assert "ipc: 1 in the run, 2 now" in capsys.readouterr().err
    assert distill.main(TINY + ["--resume", "--out", str(tmp_path / "empty")]) == 2
    assert distill.main(TINY + ["--steps", "1", "--out", str(tmp_path / "a")]) == 2  # a run is there: no --resume


@pytest.mark.parametrize("bad", [["--ipc", "0"], ["--K", "-1"], ["--K", "4", "--window", "5"], ["--init", "other"],
                                 ["--image-lr", "nan"], ["--steps", "1.5"], ["--checkpoint", "-2"],
                                 ["--eval-seeds", "0"], ["--threads", "0"]])
def test_bad_flags_are_refused_with_exit_code_2(bad: List[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        distill.main(bad + ["--out", "/nonexistent/never-written"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distill.py: error:") or "error:" in err[-1]


# ---------------------------------------------------------------- the meta-gradient, against finite differences

CLASSES, FEATURES, K = 3, 4, 5


def _problem(mlp_params: Callable[..., Dict[str, Tensor]], mlp_forward: Callable[..., Tensor]) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(0)

    def loss(params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(mlp_forward(params, x), y)

    return dict(loss=loss, params=mlp_params([FEATURES, 6, CLASSES], seed=1),
                images=torch.randn(2, CLASSES, FEATURES, generator=gen, dtype=torch.float64),  # ipc = 2
                labels=torch.arange(CLASSES), x=torch.randn(20, FEATURES, generator=gen, dtype=torch.float64),
                y=torch.randint(CLASSES, (20,), generator=gen),
                log_lrs=torch.log(torch.linspace(0.3, 0.8, K, dtype=torch.float64)))


def _outer(problem: Dict[str, Any], images: Tensor, log_lrs: Tensor, window: int = 0, checkpoint: int = 0) -> Tensor:
    f = distill.surrogate(problem["loss"], log_lrs, K, window, checkpoint)
    params = problem["params"]
    return f(params, distill.unroll.sgd(lr=1.0).init(params), images, problem["labels"],
             outer_args=(problem["x"], problem["y"]))


@pytest.mark.parametrize("checkpoint", [0, 2])
def test_meta_gradient_matches_finite_differences(checkpoint: int, mlp_params: Callable[..., Dict[str, Tensor]],
                                                  mlp_forward: Callable[..., Tensor]) -> None:
    problem = _problem(mlp_params, mlp_forward)
    images = problem["images"].clone().requires_grad_()
    log_lrs = problem["log_lrs"].clone().requires_grad_()
    _outer(problem, images, log_lrs, checkpoint=checkpoint).backward()
    assert log_lrs.grad is not None and images.grad is not None
    assert (log_lrs.grad.abs() > 1e-6).all()  # every step's learning rate receives a gradient
    eps = 1e-6
    for tensor, grad in ((problem["log_lrs"], log_lrs.grad), (problem["images"], images.grad)):
        for i in range(tensor.numel()):
            plus, minus = tensor.clone(), tensor.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            args = ((plus, problem["log_lrs"]), (minus, problem["log_lrs"])) if tensor is problem["images"] \
                else ((problem["images"], plus), (problem["images"], minus))
            numeric = (_outer(problem, *args[0]) - _outer(problem, *args[1])) / (2 * eps)
            assert float(grad.view(-1)[i]) == pytest.approx(float(numeric.detach()), rel=1e-5, abs=1e-8)


def test_window_differentiates_only_its_steps(mlp_params: Callable[..., Dict[str, Tensor]],
                                              mlp_forward: Callable[..., Tensor]) -> None:
    problem = _problem(mlp_params, mlp_forward)
    grads = []
    for window in (2, K, 0):
        log_lrs = problem["log_lrs"].clone().requires_grad_()
        _outer(problem, problem["images"], log_lrs, window=window).backward()
        grads.append(log_lrs.grad)
    assert (grads[0][:K - 2] == 0).all() and (grads[0][K - 2:] != 0).all()  # RaT-BPTT: the first K - T are constant
    torch.testing.assert_close(grads[1], grads[2], rtol=0, atol=0)  # a window of all K steps is the full gradient


def test_data_halves_are_disjoint_and_fixed(mnist_present: None) -> None:
    data = distill.load_data()
    assert len(data.y_distill) == len(data.y_held) == 5000
    again = distill.load_data(limit=100)
    assert torch.equal(again.x_distill, data.x_distill[:100]) and torch.equal(again.x_held, data.x_held[:100])
    # No digit image is in both halves (the test split holds no exact duplicates across them).
    distil_rows = {row.numpy().tobytes() for row in data.x_distill.flatten(1)}
    assert not any(row.numpy().tobytes() in distil_rows for row in data.x_held.flatten(1))
