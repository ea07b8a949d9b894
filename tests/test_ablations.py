"""The App. B ablations (examples/gan/second_gradient.py, historical_averaging.py) and the public-API rule."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import historical_averaging as ha
import second_gradient as sg
import unroll
from unroll_examples import runs
from unroll_examples.metrics import steps_to_stable_coverage
from unroll_examples.training import Strategies, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--seeds", "0-1", "--eval-every", "2", "--eval-samples", "200", "--threads", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{"batch": 64, "eval_samples": 200, "eval_every": 2, "steps": 4, "d_lr": 1e-3,
                          "g_lr": 1e-3, **kwargs})


def assert_trees_close(a: Any, b: Any, **tol: float) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_trees_close(a[k], b[k], **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


# ---- steps to stable coverage ----
def records(*rows: tuple) -> List[Dict[str, Any]]:
    return [{"step": s, "modes_strict": m, "hq": h} for s, m, h in rows]


def test_stable_coverage_is_the_start_of_the_final_good_stretch() -> None:
    run = records((0, 0, 0.0), (250, 8, 0.10), (500, 7, 0.20), (750, 8, 0.06), (1000, 8, 0.30))
    assert steps_to_stable_coverage(run, 8) == 750  # the drop at 500 restarts the clock
    assert steps_to_stable_coverage(list(reversed(run)), 8) == 750  # order of the records does not matter
    assert steps_to_stable_coverage(run, 8, min_hq=0.1) == 1000  # 6% HQ at 750 is not enough for 10%


def test_stable_coverage_is_none_when_the_last_evaluation_fails() -> None:
    assert steps_to_stable_coverage(records((0, 8, 0.5), (250, 8, 0.5), (500, 8, 0.01)), 8) is None
    assert steps_to_stable_coverage(records((0, 1, 0.9), (250, 1, 0.9)), 8) is None  # one mode at 90% HQ


# ---- the ensemble of past discriminators ----
def ensemble_of(size: int, period: int = 1, loss: str = "saturating") -> Strategies:
    return Strategies(generator=ha.HistoricalAverage(size, period, loss=loss))


def snapshot(value: float) -> Dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), "b": torch.tensor(value)}


def test_history_keeps_one_snapshot_every_period() -> None:
    rule = ha.HistoricalAverage(size=3, period=2)
    extra = rule.init_extra(snapshot(0.0))
    extra = rule.after_d_step(extra, snapshot(1.0), None)
    assert extra["history"]["b"].tolist() == [1.0, 0.0, 0.0] and extra["valid"].tolist() == [1.0, 0.0, 0.0]
    for t in range(2, 8):
        extra = rule.after_d_step(extra, snapshot(float(t)), None)
    # Snapshots after D updates 1, 3, 5, 7; the ensemble holds the newest three.
    assert extra["history"]["b"].tolist() == [7.0, 5.0, 3.0]
    assert extra["history"]["w"][:, 0].tolist() == [7.0, 5.0, 3.0]
    assert extra["valid"].tolist() == [1.0, 1.0, 1.0] and float(extra["updates"]) == 7.0


@pytest.mark.parametrize("combine", ha.COMBINES)
def test_ensemble_probabilities_ignore_members_not_yet_taken(combine: str) -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0], [30.0, -30.0]], dtype=torch.float64)
    valid = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    log_real, log_fake = ha.ensemble_log_probs(logits, valid, combine)
    members = torch.sigmoid(logits[:2])
    expected = members.mean(0) if combine == "probabilities" else torch.sigmoid(logits[:2].mean(0))
    torch.testing.assert_close(log_real.exp(), expected)
    torch.testing.assert_close(log_fake.exp(), 1 - expected)


def test_ensemble_gradient_is_finite_with_empty_slots() -> None:
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(ha.ensemble_log_probs(logits, valid, "probabilities")[1].mean(), logits)
    assert torch.isfinite(grad).all() and (grad[1:] == 0).all() and (grad[0] != 0).all()


@pytest.mark.parametrize("loss", ["saturating", "nonsaturating"])
def test_ensemble_of_one_is_the_plain_gan(loss: str) -> None:
    """N = 1 (the current D) trains exactly like K = 0: the ensemble adds nothing but bookkeeping."""
    cfg = small(K=0, loss=loss, steps=3)
    plain = Trainer(cfg, [0, 1])
    ensemble = Trainer(cfg, [0, 1], strategies=ensemble_of(1, loss=loss))
    for trainer in (plain, ensemble):
        for _ in range(cfg.steps):
            trainer.state, _ = trainer.step_fn(trainer.state, trainer.draw_batch())
    assert_trees_close(ensemble.state["g"], plain.state["g"], rtol=1e-5, atol=1e-6)
    assert_trees_close(ensemble.state["d"], plain.state["d"], rtol=1e-5, atol=1e-6)


def test_a_larger_ensemble_trains_differently() -> None:
    cfg = small(K=0, steps=3)
    one = Trainer(cfg, [0, 1], strategies=ensemble_of(1))
    five = Trainer(cfg, [0, 1], strategies=ensemble_of(5))
    for trainer in (one, five):
        trainer.run()
    assert not torch.allclose(one.state["g"]["w2"], five.state["g"]["w2"])


def test_ensemble_run_resumes_with_the_same_numbers(tmp_path: Path) -> None:
    cfg = small(K=0, steps=6)
    strategies = ensemble_of(3, period=2)
    uninterrupted = Trainer(cfg, [0, 1], out_dir=tmp_path / "a", strategies=strategies)
    uninterrupted.run()
    first = Trainer(small(K=0, steps=4), [0, 1], out_dir=tmp_path / "b", strategies=strategies)
    first.run()
    resumed = Trainer(cfg, [0, 1], out_dir=tmp_path / "b", strategies=strategies, resume=True)
    resumed.run()
    assert_trees_close(resumed.state, uninterrupted.state, rtol=0, atol=0)


def test_ensemble_rule_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="size and period"):
        ha.HistoricalAverage(0)
    with pytest.raises(ValueError, match="combine"):
        ha.HistoricalAverage(2, combine="median")


# ---- the sweeps, end to end ----
def test_second_gradient_sweep_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "second_gradient.md"
    argv = TINY + ["--steps", "4", "--steps-g5", "2", "--ks", "0", "2", "--out", str(tmp_path / "runs"),
                   "--doc", str(doc)]
    assert sg.main(argv) == 0
    page = doc.read_text()
    assert "Status: **complete**" in page and "python examples/gan/second_gradient.py" in page
    for label in ("K=0 (plain GAN)", "full, K=2", "stop_grad, K=2", "stop_grad_avg, K=2"):
        assert page.count(f"| {label} |") == 2  # once per regime
    for regime in (1, 5):
        assert (tmp_path / "second_gradient" / f"second_gradient_g{regime}.png").stat().st_size > 1000
    g5 = json.loads(next((tmp_path / "runs" / "g5").glob("*K2*stopgrad_avg*/metrics.json")).read_text())
    assert g5["config"]["g_steps"] == 5 and g5["config"]["average_over_steps"] and g5["status"] == "done"
    per_seed = json.loads((tmp_path / "second_gradient" / "per_seed.json").read_text())
    # K=0, 3 configs × K=2; 2 regimes
    assert len(per_seed["rows"]) == 2 * 4 and all(row["seeds"] == [0, 1] for row in per_seed["rows"])
    assert [row["iterations"] for row in per_seed["rows"]] == [4] * 4 + [2] * 4  # each regime's own length
    assert "per_seed.json" in page

    assert sg.main(argv) == 2  # the runs exist: continuing them needs --resume
    before = page
    assert sg.main(argv + ["--resume"]) == 0  # everything is finished: nothing is retrained
    assert doc.read_text() == before


def test_second_gradient_configurations_differ_in_what_they_train(tmp_path: Path) -> None:
    states = {}
    for name, flags in sg.CONFIGS.items():
        trainer = Trainer(small(K=3, steps=2, unroll_lr=1e-2, **flags), [0, 1])
        trainer.run()
        states[name] = trainer.state["g"]["w2"]
    assert not torch.allclose(states["full"], states["stop_grad"])
    assert not torch.allclose(states["stop_grad"], states["stop_grad_avg"])


def test_historical_averaging_sweep_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "historical_averaging.md"
    argv = TINY + ["--steps", "4", "--sizes", "1", "5", "--periods", "1", "3", "--unrolled-ks", "2",
                   "--timing-iterations", "2", "--timing-rounds", "1", "--out", str(tmp_path / "runs"),
                   "--doc", str(doc)]
    assert ha.main(argv) == 0
    page = doc.read_text()
    assert "Status: **complete**" in page
    for label in ("last N=1", "last N=5", "5 every P=1", "5 every P=3", "unrolled K=2"):
        assert f"| {label} |" in page
    # The cost column: timed side by side after the warm-up that fills the largest ensemble, over N=1's.
    assert page.count("cost vs last N=1 (timed) |") == 3 and "after 5 untimed iterations" in page
    assert re.search(r"\| last N=1 \|.*\| 1\.00× \|", page)
    rows = json.loads((tmp_path / "historical_averaging" / "per_seed.json").read_text())["rows"]
    assert all(row["s_per_iteration_timed"] > 0 for row in rows)
    # "5 every P=1" is "last N=5": one run folder serves both rows.
    assert len(list((tmp_path / "runs" / "ensembles").iterdir())) == 3
    final = runs.read_final(next((tmp_path / "runs" / "ensembles").glob("*size5_every3*")) / runs.FINAL)
    assert final.state["extra"]["valid"].sum(dim=1).tolist() == [2.0, 2.0]  # snapshots after updates 1 and 4
    for name in ("last_n", "period", "unrolled"):
        assert (tmp_path / "historical_averaging" / f"historical_averaging_{name}.png").exists()


def test_resume_needs_runs_to_continue(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--resume on an empty folder is refused: it used to start the whole sweep."""
    argv = TINY + ["--steps", "2", "--sizes", "1", "--periods", "1", "--unrolled-ks", "1", "--resume",
                   "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "page.md")]
    assert ha.main(argv) == 2
    assert "holds no checkpoint to continue" in capsys.readouterr().err
    assert not (tmp_path / "page.md").exists() and not list((tmp_path / "runs").rglob("metrics.json"))


@pytest.mark.parametrize("script, bad", [
    (sg, ["--ks", "-1"]), (sg, ["--min-hq", "2"]), (sg, ["--seeds", "3-1"]), (sg, ["--regimes", "2"]),
    (ha, ["--sizes", "0"]), (ha, ["--combine", "median"]), (ha, ["--threads", "0"]),
    (ha, ["--seeds", "0-99999999999"]),
])
def test_bad_flags_are_argparse_errors(script: Any, bad: List[str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        script.main(bad + ["--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "page.md")])
    assert error.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing was trained


# ---- examples are clients of the public API only ----
def unroll_names_used(path: Path) -> List[str]:
    """Every name an example takes from ``unroll``: ``from unroll[.x] import y`` and ``unroll.y`` attributes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if alias.name == "unroll"}
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used += [alias.name for alias in node.names if alias.name.startswith("unroll.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "unroll":
            prefix = "" if node.module == "unroll" else node.module + ":"
            used += [prefix + alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            used.append(node.attr)
    return used


def test_examples_use_only_public_unroll_names() -> None:
    files = sorted((ROOT / "examples").rglob("*.py"))
    assert len(files) > 5
    private = {f"{path.relative_to(ROOT)}: {name}" for path in files for name in unroll_names_used(path)
               if name not in unroll.__all__}
    assert not private, f"examples use names outside unroll.__all__: {sorted(private)}"


def test_the_public_api_check_sees_private_imports(tmp_path: Path) -> None:
    example = tmp_path / "bad.py"
    example.write_text("import unroll\nfrom unroll._flat import FlatLayout\nfrom unroll import adam\n"
                       "x = unroll._math.safe_sqrt\ny = unroll.surrogate_loss\n")
    assert sorted(unroll_names_used(example)) == ["_math", "adam", "surrogate_loss", "unroll._flat:FlatLayout"]
