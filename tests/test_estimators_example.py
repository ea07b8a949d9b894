"""examples/estimators (the side-by-side comparison of meta-gradient estimators), on tiny versions of its problems:
the exact gradient of every problem against float64 finite differences; the implicit gradient against the exact
unroll and against ridge regression's closed-form hypergradient where the inner problem converges; each
estimator against what it estimates (checkpointing and full-length truncation equal to the exact unroll, TBPTT over
one window equal to the step-averaged gradient, ES and PES unbiased for their targets, truncated ES for TBPTT's);
and a tiny run of every problem x estimator: its numbers, --resume keeping finished cells, damaged cells refused,
foreign files untouched, and the peak-memory probe in its subprocess."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Dict, Tuple

import compare
import problems
import pytest
import torch
from torch import Tensor

from unroll_examples import mnist_data as md

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

Params = Dict[str, Tensor]


@pytest.fixture(scope="module")
def digits() -> Tuple[Tensor, Tensor]:
    if not md.has_split("test"):
        pytest.skip(md.how_to_get("test"))
    return problems.mnist_digits()


def tiny(name: str, seed: int = 0, digits: Tuple[Tensor, Tensor] | None = None, device: str = "cpu"
         ) -> problems.Problem:
    if name == "hyperparameter":
        return problems.hyperparameter(seed, K=12, window=4, features=6, n_train=6, n_val=40, n_test=40,
                                       device=device)
    if name == "hyperparameter_converged":
        return problems.hyperparameter(seed, K=200, window=50, features=6, n_train=12, n_val=40, n_test=40,
                                       weight_decay=0.3, lr=0.3, device=device)
    if name == "distillation":
        assert digits is not None
        return problems.distillation(seed, K=4, window=2, digits=digits, hidden=6, n_real=40, n_test=40,
                                     device=device)
    return problems.gan(seed, K=6, window=3, batch=12, hidden=4, device=device)


def as_vector(grads: Params) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def directional_fd(problem: problems.Problem, direction: Params, eps: float = 1e-6) -> float:
    """(f(phi + eps d) - f(phi - eps d)) / 2 eps, f = outer(theta_K(phi)) in float64: shares nothing with
    backpropagation through the unroll but the forward steps."""
    def at(sign: float) -> float:
        return problems.final_outer_loss(problem, {n: p + sign * eps * direction[n] for n, p in problem.phi0.items()})
    return (at(1.0) - at(-1.0)) / (2 * eps)


def random_direction(phi: Params, seed: int = 0) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in phi.items()}


CFG = compare.Config()


def estimate(name: str, problem: problems.Problem, seed: int = 0, cfg: compare.Config = CFG) -> Tensor:
    return as_vector(compare.ESTIMATORS[name].strategy(cfg, problem, problem.phi0, seed).grads)


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("name", ["hyperparameter", "gan", "distillation"])
def test_exact_gradient_matches_float64_finite_differences(name: str, request: pytest.FixtureRequest) -> None:
    problem = tiny(name, digits=request.getfixturevalue("digits") if name == "distillation" else None)
    grads = compare.ESTIMATORS["exact"].strategy(CFG, problem, problem.phi0, 0).grads
    for seed in range(2):
        direction = random_direction(problem.phi0, seed)
        analytic = float(sum((grads[n] * direction[n]).sum() for n in grads))
        assert analytic == pytest.approx(directional_fd(problem, direction), rel=1e-6, abs=1e-10)


def test_implicit_equals_exact_and_the_closed_form_where_the_inner_problem_converges() -> None:
    problem = tiny("hyperparameter_converged")
    exact = estimate("exact", problem)
    closed_form = float(problems.ridge_hypergradient(problem, problem.phi0))
    for solver in ("implicit_cg", "implicit_neumann", "implicit_fixed_point"):
        implicit = estimate(solver, problem)
        assert float(implicit[0]) == pytest.approx(closed_form, rel=1e-6), solver  # log weight decay
        assert float((implicit - exact).norm()) <= 1e-6 * float(exact.norm()), solver
    # The learning rate does not move a converged solution: both estimators give (nearly) nothing there.
    assert abs(float(exact[1])) < 1e-8 * abs(float(exact[0])) + 1e-12


def test_implicit_reports_how_far_the_unconverged_problem_is_from_stationary() -> None:
    problem = tiny("hyperparameter")  # 12 steps: far from the ridge minimiser
    result = compare.ESTIMATORS["implicit_cg"].strategy(CFG, problem, problem.phi0, 0)
    inner_gradient = torch.func.grad(lambda w: problem.inner({"w": w}, problem.phi0))(
        problems.trained(problem, problem.phi0)["w"])
    assert result.diagnostics["stationarity"] == pytest.approx(float(inner_gradient.norm()), rel=1e-9)
    assert result.diagnostics["stationarity"] > 1e-3 and result.diagnostics["residual"] < 1e-8
    exact = estimate("exact", problem)
    assert float((as_vector(result.grads) - exact).norm()) > 0.3 * float(exact.norm())  # biased off the fixed point


@pytest.mark.parametrize("name", ["hyperparameter", "gan"])
def test_checkpoint_and_full_length_truncation_are_the_exact_unroll(name: str) -> None:
    problem = tiny(name)
    exact = estimate("exact", problem)
    assert torch.allclose(estimate("checkpoint", problem, cfg=compare.Config(checkpoint=2)), exact, rtol=1e-10,
                          atol=1e-14)
    whole = dataclasses.replace(problem, window=problem.K)
    assert torch.allclose(estimate("truncated", whole), exact, rtol=1e-10, atol=1e-14)
    assert torch.allclose(estimate("tbptt", whole), estimate("exact_average", problem), rtol=1e-10, atol=1e-14)
    # With several windows TBPTT drops the dependence across them: a different (biased) gradient.
    assert not torch.allclose(estimate("tbptt", problem), estimate("exact_average", problem), rtol=1e-3)


def test_evolution_strategies_are_unbiased_for_their_targets_and_truncated_es_for_tbptt() -> None:
    problem = dataclasses.replace(tiny("hyperparameter"), K=16, window=2)  # 8 windows: TBPTT's bias is 40 %
    many = compare.Config(es_particles=2000, pes_particles=2000, es_sigma=1e-3)
    es = estimate("es", problem, cfg=many)
    exact = estimate("exact", problem)
    assert float((es - exact).norm()) < 0.1 * float(exact.norm())
    pes = estimate("pes", problem, cfg=many)
    average = estimate("exact_average", problem)
    assert float((pes - average).norm()) < 0.15 * float(average.norm())
    tes, tbptt = estimate("tes", problem, cfg=many), estimate("tbptt", problem)
    assert float((tes - tbptt).norm()) < 0.1 * float(tbptt.norm())
    assert float((tbptt - average).norm()) > 0.3 * float(average.norm())  # so the last check could fail


def test_ridge_closed_form_matches_finite_differences_of_the_ridge_solution() -> None:
    """The closed form the implicit estimator is checked against is itself checked: finite differences of the
    validation loss at w*(lambda) = solve(X'X/n + lambda I, X'y/n), computed from the problem's own losses."""
    problem = tiny("hyperparameter_converged")

    def validation_at_solution(log_wd: float) -> float:
        phi = {**problem.phi0, "log_weight_decay": torch.tensor(log_wd, dtype=torch.float64)}
        w = torch.zeros_like(problem.theta0["w"])
        hessian = torch.func.hessian(lambda v: problem.inner({"w": v}, phi))(w)
        w_star = torch.linalg.solve(hessian, -torch.func.grad(lambda v: problem.inner({"w": v}, phi))(w))
        return float(problem.outer({"w": w_star}, phi))

    x = float(problem.phi0["log_weight_decay"])
    fd = (validation_at_solution(x + 1e-6) - validation_at_solution(x - 1e-6)) / 2e-6
    assert float(problems.ridge_hypergradient(problem, problem.phi0)) == pytest.approx(fd, rel=1e-6)


# ---------------------------------------------------------------------------------------------- the whole run


TINY_FLAGS = ["--seeds", "3", "--deterministic-seeds", "2", "--timing-reps", "1", "--es-particles", "8",
              "--pes-particles", "8", "--checkpoint", "2", "--implicit-iterations", "30", "--outer-steps", "2",
              "--outer-seeds", "2", "--outer-estimators", "exact,es,pes", "--no-memory", "--threads", "1"]


@pytest.fixture
def tiny_problems(monkeypatch: pytest.MonkeyPatch, digits: Tuple[Tensor, Tensor]) -> None:
    registry: Dict[str, Callable[[int, str], problems.Problem]] = {
        name: (lambda seed, device, name=name: tiny(name, seed, digits, device)) for name in compare.PROBLEMS}
    monkeypatch.setattr(compare, "PROBLEMS", registry)


@pytest.mark.usefixtures("tiny_problems")
def test_a_tiny_run_of_every_problem_and_estimator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a file the run did not make: never touched
    assert compare.main(TINY_FLAGS + ["--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["problems"]) == set(compare.PROBLEMS)
    for name, result in results["problems"].items():
        rows = result["estimators"]
        assert set(rows) == set(compare.ESTIMATORS), name
        for row in rows.values():
            assert len(row["seconds"]) == 1 and row["peak_bytes"] is None
        for reference in ("exact", "exact_average"):
            assert rows[reference]["stats"]["rel_error_of_mean"] == 0.0
        assert rows["checkpoint"]["stats"]["rel_error_of_mean"] < 1e-10
        for deterministic in ("exact", "truncated", "tbptt", "implicit_cg"):
            assert rows[deterministic]["stats"]["rel_std"] == 0.0 and rows[deterministic]["stats"]["n"] == 2
        for stochastic in ("es", "pes", "tes"):
            stats = rows[stochastic]["stats"]
            assert stats["n"] == 3 and stats["rel_std"] > 0 and -1 <= stats["cos_per_seed"][0] <= 1
    converged = results["problems"]["hyperparameter_converged"]["estimators"]["implicit_cg"]["stats"]
    assert converged["rel_error_of_mean"] < 1e-6 and converged["diagnostics"]["stationarity"] < 1e-8
    outer = results["outer"]["hyperparameter"]
    for run in outer["estimators"]["exact"]["runs"]:  # two Adam steps along the exact gradient lower the loss
        assert run["error"] is None and len(run["validation"]) == 3 and run["validation"][-1] < run["validation"][0]
    assert {r["control"] for r in outer["controls"]} == {"phi0 (no outer steps)",
                                                          "best of 17 weight decays 1e-3..10 (validation)"}
    table = (out / "table.md").read_text()
    assert "python examples/estimators/compare.py --seeds 3" in table and "### gan" in table
    assert (out / "figure.png").stat().st_size > 1000 and (out / "notes.txt").read_text() == "mine"

    # A finished folder is refused without --resume; with it, every cell is read back and nothing recomputed.
    assert compare.main(TINY_FLAGS + ["--out", str(out)]) == 2
    cells = sorted((out / "cells").rglob("*.json"))
    before = {path: path.read_bytes() for path in cells}

    def must_not_run(*args: object) -> None:
        raise AssertionError("a finished cell was recomputed")

    for computation in ("gradients", "timing", "outer_optimisation", "controls"):
        monkeypatch.setattr(compare, computation, must_not_run)
    assert compare.main(TINY_FLAGS + ["--out", str(out), "--resume"]) == 0
    assert {path: path.read_bytes() for path in cells} == before
    assert json.loads((out / "results.json").read_text())["problems"] == results["problems"]

    # A damaged cell is refused by name and left as it is.
    damaged = next(path for path in cells if "gradients" in path.parts)
    payload = json.loads(damaged.read_text())
    payload["payload"]["estimates"] = "lost"
    damaged.write_text(json.dumps(payload))
    assert compare.main(TINY_FLAGS + ["--out", str(out), "--resume"]) == 2
    assert json.loads(damaged.read_text())["payload"]["estimates"] == "lost"


@pytest.mark.usefixtures("tiny_problems")
def test_resume_computes_only_the_missing_cells(tmp_path: Path) -> None:
    flags = TINY_FLAGS + ["--problems", "gan", "--outer-problems", "", "--out", str(tmp_path)]
    assert compare.main(flags + ["--estimators", "exact,es"]) == 0
    first = {path: path.stat().st_mtime_ns for path in (tmp_path / "cells").rglob("*.json")}
    assert compare.main(flags + ["--estimators", "exact,es,tbptt", "--resume"]) == 0
    second = {path: path.stat().st_mtime_ns for path in (tmp_path / "cells").rglob("*.json")}
    assert all(second[path] == mtime for path, mtime in first.items())  # kept, not rewritten
    new = {path.parent.name + "/" + path.name.split("-")[0] for path in set(second) - set(first)}
    assert new == {"gan/tbptt", "gan/exact_average", "gan/all"}  # its gradients, its reference, the timings
    rows = json.loads((tmp_path / "results.json").read_text())["problems"]["gan"]["estimators"]
    assert set(rows) == {"exact", "es", "exact_average", "tbptt"}


def test_the_memory_probe_measures_every_estimator_in_a_subprocess() -> None:
    cfg = compare.Config(es_particles=8)
    result = compare.memory(cfg, "gan", ["exact", "es"], threads=1)
    assert set(result["peak_bytes"]) == {"exact", "es"}
    assert all(isinstance(v, int) and abs(v) < 2 ** 30 for v in result["peak_bytes"].values())


def test_bad_flags_are_refused() -> None:
    with pytest.raises(SystemExit) as exit_:
        compare.parse_args(["--estimators", "exact,magic"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        compare.parse_args(["--es-particles", "1"])
    cfg, _ = compare.parse_args(["--seeds", "4", "--no-memory"])
    assert cfg.seeds == 4 and cfg.memory is False and math.isclose(cfg.es_sigma, compare.Config.es_sigma)


def test_the_device_is_cpu_by_default_and_an_unusable_one_is_refused_in_one_line_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.Config().device == "cpu" and compare.parse_args([])[0].device == "cpu"
    refused = {"gpu": "choose cpu or cuda[:N]", "cuda:x": "choose cpu or cuda[:N]", "meta": "choose cpu or cuda[:N]"}
    if not torch.cuda.is_available():
        refused["cuda"] = "CUDA is not available here"
    for device, reason in refused.items():
        out = tmp_path / device.replace(":", "_")
        assert compare.main(["--device", device, "--problems", "gan", "--out", str(out)]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --device {device!r}: ") and reason in lines[0]
        assert not out.exists()  # refused before the run claimed its folder


def test_cpu_cells_keep_the_names_they_had_before_devices_and_other_devices_get_their_own() -> None:
    """The name of a CPU cell is recomputed here from the key as it was written before ``--device`` existed, so a
    --resume of an earlier CPU run finds its cells."""
    def key(cfg: compare.Config) -> Dict[str, object]:
        return compare.cell_key(cfg, "gradients", "gan", "es", ["es"], seeds=cfg.seeds)

    before = {"kind": "gradients", "problem": "gan", "estimator": "es",
              "settings": {"es_particles": 32, "es_sigma": 0.01}, "seeds": 10}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    for cfg in (compare.Config(), compare.Config(device="cpu")):
        assert key(cfg) == before
        assert compare.cell_path(Path("run"), key(cfg)) == Path(f"run/cells/gradients/gan/es-{digest}.json")
    on_gpu = key(compare.Config(device="cuda"))
    assert on_gpu == {**before, "device": "cuda"}
    assert compare.cell_path(Path("run"), on_gpu).name != f"es-{digest}.json"
