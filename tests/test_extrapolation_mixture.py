"""examples/gan/extrapolation.py: the one-step extrapolation g_0 + α(g_1 − g_0) on the 2-D mixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List

import pytest
import torch

import extrapolation as ex
from unroll_examples.metrics import METRIC_NAMES
from unroll_examples.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--seeds", "0-1", "--eval-every", "2", "--eval-samples", "200", "--threads", "1", "--no-progress",
        "--timing-iterations", "1", "--timing-rounds", "1"]


def small(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{"batch": 64, "eval_samples": 200, "eval_every": 2, "steps": 4, "d_lr": 1e-3,
                          "g_lr": 1e-3, "unroll_lr": 1e-2, **kwargs})


def trained(cfg: TrainConfig, alpha: Any = None) -> Trainer:
    trainer = Trainer(cfg, [0, 1], strategies=None if alpha is None else ex.extrapolated(cfg, alpha))
    trainer.run()
    return trainer


def leaves(tree: Any) -> List[torch.Tensor]:
    return [x for v in tree.values() for x in leaves(v)] if isinstance(tree, dict) else [tree]


def test_alpha_one_trains_exactly_like_k_one() -> None:
    """α = 1: the weight of g_0 is exactly 0 and that of g_1 exactly 1, so every parameter, Adam state and
    metric is the K = 1 run's, bit for bit (the loss value f_0 + (f_1 − f_0) may differ from f_1 in the last bit)."""
    cfg = small(K=1)
    one_step, alpha_one = trained(cfg), trained(cfg, alpha=1.0)
    for a, b in zip(leaves(alpha_one.state), leaves(one_step.state), strict=True):
        assert torch.equal(a, b)
    assert [{k: r[k] for k in METRIC_NAMES} for r in alpha_one.records] == \
        [{k: r[k] for k in METRIC_NAMES} for r in one_step.records]


def test_larger_alpha_moves_the_generator_further_along_the_unrolling_direction() -> None:
    """One G step's gradient is g_0 + α(g_1 − g_0): linear in α, checked on the generator's first update."""
    cfg = small(K=1, steps=1)
    grads = {}
    for alpha in (0.0, 1.0, 3.0):
        trainer = Trainer(cfg, [0, 1], strategies=ex.extrapolated(cfg, alpha))
        before = trainer.state["g"]["w2"].clone()
        trainer.state, _ = trainer.step_fn(trainer.state, trainer.draw_batch())
        grads[alpha] = trainer.state["g_opt"]["exp_avg"]["w2"] / (1 - cfg.beta1)  # first Adam step: m = (1-β1) g
        assert not torch.equal(trainer.state["g"]["w2"], before)
    torch.testing.assert_close(grads[3.0], grads[0.0] + 3 * (grads[1.0] - grads[0.0]), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(grads[1.0], grads[0.0])  # the look-ahead changes the gradient


def test_extrapolation_sweep_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "extrapolation.md"
    argv = TINY + ["--steps", "4", "--alphas", "1", "3", "--ks", "0", "1", "--control", "1",
                   "--out", str(tmp_path / "runs"), "--doc", str(doc)]
    assert ex.main(argv) == 0
    page = doc.read_text()
    assert "Status: **complete**" in page and "python examples/gan/extrapolation.py" in page
    for label in ("K=0 (plain GAN)", "K=1", "extrapolated α=1 (the K=1 run)", "extrapolated α=3",
                  "control, 2 D steps"):
        assert f"| {label} |" in page
    assert "| K=0 (plain GAN) | 4 |" in page and "| 1.00× |" in page
    per_seed = json.loads((tmp_path / "extrapolation" / "per_seed.json").read_text())
    rows = {row["label"]: row for row in per_seed["rows"]}
    assert len(rows) == 5 and all(row["seeds"] == [0, 1] and row["s_per_iteration_timed"] > 0
                                  for row in rows.values())
    # α = 1 trains K = 1 bit for bit (above), so it is the K = 1 run; α = 3 is a run of its own.
    assert rows["extrapolated α=1 (the K=1 run)"]["folder"] == rows["K=1"]["folder"]
    assert rows["extrapolated α=3"]["folder"] != rows["K=1"]["folder"]
    assert rows["extrapolated α=3"]["reverse_kl"] != rows["K=1"]["reverse_kl"]
    assert len(list((tmp_path / "runs" / "main").iterdir())) == 4
    assert (tmp_path / "extrapolation" / "extrapolation.png").stat().st_size > 1000


@pytest.mark.parametrize("bad", [["--ks", "1", "5"], ["--control", "0"], ["--timing-rounds", "0"],
                                 ["--alphas", "nan"]])
def test_bad_flags_are_argparse_errors(bad: List[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        ex.main(bad + ["--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "page.md")])
    assert error.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
