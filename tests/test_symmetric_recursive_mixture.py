"""examples/gan/symmetric_recursive.py: symmetric and recursive unrolling on the 2-D mixture (the trainer's
rules of D and of G's parameters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

import symmetric_recursive as sr
import unroll
from unroll_examples.models import init_discriminator, init_generator
from unroll_examples.training import Strategies, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--seeds", "0-1", "--eval-every", "2", "--eval-samples", "200", "--threads", "1", "--no-progress",
        "--timing-iterations", "1", "--timing-rounds", "1"]


def small(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{"batch": 64, "eval_samples": 200, "eval_every": 2, "steps": 3, "d_lr": 1e-3,
                          "g_lr": 1e-3, "unroll_lr": 1e-2, **kwargs})


def leaves(tree: Any) -> List[torch.Tensor]:
    return [x for v in tree.values() for x in leaves(v)] if isinstance(tree, dict) else [tree]


def trained(cfg: TrainConfig, strategies: Any = None) -> Trainer:
    trainer = Trainer(cfg, [0, 1], strategies=strategies)
    trainer.run()
    return trainer


def test_symmetric_with_k0_trains_like_the_plain_gan() -> None:
    """K = 0: D's look-ahead loss is L_D itself, so every parameter and Adam state is the plain run's."""
    cfg = small(K=0)
    plain, symmetric = trained(cfg), trained(cfg, sr.symmetric(cfg))
    for a, b in zip(leaves(symmetric.state), leaves(plain.state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recursive_with_k1_is_one_sided_and_differs_from_k2() -> None:
    """One simultaneous joint step moves D from (θ_G, θ_D) whatever G does, so recursive K = 1 is the paper's
    K = 1; from K = 2 on, D's look-ahead answers a moving G and the runs part."""
    one_sided, recursive = trained(small(K=1)), trained(small(K=1), sr.recursive(small(K=1)))
    for a, b in zip(leaves(recursive.state), leaves(one_sided.state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    one_sided2, recursive2 = trained(small(K=2)), trained(small(K=2), sr.recursive(small(K=2)))
    assert not torch.allclose(recursive2.state["g"]["w2"], one_sided2.state["g"]["w2"], rtol=1e-4, atol=1e-6)


def float64_players(seed: int = 0) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    g = {k: v.double() for k, v in init_generator(gen).items()}
    d = {k: v.double() for k, v in init_discriminator(gen).items()}
    adam = unroll.adam(1e-2)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64)
    z = torch.randn(32, 256, generator=gen, dtype=torch.float64)

    def warm(params: Dict[str, torch.Tensor]) -> Any:
        # A few steps on random gradients: a fresh Adam's first step is lr * sign(grad), flat almost everywhere.
        state = adam.init(params)
        for _ in range(3):
            _, state = adam.apply(params, {k: torch.randn(v.shape, generator=gen, dtype=v.dtype)
                                           for k, v in params.items()}, state)
        return state
    return {"g": g, "d": d, "g_state": warm(g), "d_state": warm(d), "x": x, "z": z}


def directional_check(loss: Callable[[Dict[str, torch.Tensor]], torch.Tensor], params: Dict[str, torch.Tensor],
                      seed: int = 1) -> torch.Tensor:
    """The hook's gradient (torch.func.grad) against a central finite difference along a random direction, in
    float64; returns the gradient."""
    grads = torch.func.grad(loss)(params)
    gen = torch.Generator().manual_seed(seed)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    eps = 1e-8  # ReLU kinks: at 1e-6 even L_D alone crosses one on this batch; float64 keeps 1e-8 accurate
    plus = loss({k: v + eps * direction[k] for k, v in params.items()})
    minus = loss({k: v - eps * direction[k] for k, v in params.items()})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum((grads[k] * direction[k]).sum() for k in params)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    return grads


def test_symmetric_discriminator_gradient_matches_finite_differences() -> None:
    """D's gradient through G's K = 2 Adam look-ahead steps (the total derivative, G's response included)."""
    p = float64_players()
    rule = sr.symmetric(small(K=2, unroll_lr=1e-2)).discriminator
    assert isinstance(rule, sr.SymmetricD)
    grads = directional_check(lambda d: rule.loss(d, p["g"], p["g_state"], p["x"], p["z"]), p["d"])
    plain = torch.func.grad(lambda d: sr.g_inner_loss(p["g"], d, p["x"], p["z"], "relu").neg())(p["d"])
    assert not torch.allclose(grads["w0"], plain["w0"])  # the look-ahead changes D's gradient


def test_recursive_generator_gradient_matches_finite_differences() -> None:
    """G's gradient through K = 2 joint look-ahead steps of both players, in which G moves too."""
    p = float64_players()
    rule = sr.recursive(small(K=2, unroll_lr=1e-2)).generator
    assert isinstance(rule, sr.Recursive)
    directional_check(lambda g: rule.params_loss(g, p["g_state"], p["d"], p["d_state"], p["x"], p["z"]), p["g"])


def test_own_rules_reject_resampled_batches() -> None:
    cfg = small(K=1, unroll_batches="resampled")
    for strategies in (sr.symmetric(cfg), sr.recursive(cfg), Strategies(discriminator=sr.symmetric(cfg).discriminator)):
        with pytest.raises(ValueError, match="resampled"):
            Trainer(cfg, [0], strategies=strategies)


def test_sweep_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "symmetric_recursive.md"
    argv = TINY + ["--steps", "2", "--ks", "1", "2", "--out", str(tmp_path / "runs"), "--doc", str(doc)]
    assert sr.main(argv) == 0
    page = doc.read_text()
    assert "Status: **complete**" in page and "python examples/gan/symmetric_recursive.py" in page
    labels = ["K=0 (plain GAN)", "one-sided K=1 (the paper)", "symmetric K=1", "one-sided K=2 (the paper)",
              "symmetric K=2", "recursive K=2"]
    for label in labels:
        assert f"| {label} |" in page
    assert "recursive K=1" not in page  # the one-sided run (test above)
    per_seed = json.loads((tmp_path / "symmetric_recursive" / "per_seed.json").read_text())
    assert [row["label"] for row in per_seed["rows"]] == labels
    assert all(row["seeds"] == [0, 1] and row["s_per_iteration_timed"] > 0 for row in per_seed["rows"])


def test_bad_flags_are_argparse_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        sr.main(["--ks", "0", "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "page.md")])
    assert error.value.code == 2
    assert "--ks must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
