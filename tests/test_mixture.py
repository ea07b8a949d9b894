"""The mixture experiment (examples/gan): determinism, vmap == alone, resume, divergence, outputs, flags."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

import mixture
import sweep_mixture
import unroll
from unroll_examples import runs
from unroll_examples.models import d_loss_from_logits, discriminator_forward, generator_forward
from unroll_examples.training import (
    CHECKPOINT,
    GeneratorRule,
    StepInputs,
    Strategies,
    TrainConfig,
    Trainer,
    index_state,
    init_state,
)

SMALL = dict(batch=64, eval_samples=400, eval_every=2)


def small(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{**SMALL, "steps": 4, **kwargs})


@dataclass(frozen=True)
class Counting(GeneratorRule):
    """A generator rule with per-seed state: ``extra["count"]`` counts D updates; G's loss is ``loss(count, d,
    x, fake)`` of its samples."""

    loss: Callable[..., torch.Tensor]
    activation: str = "relu"

    def init_extra(self, d: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"count": torch.zeros(())}

    def after_d_step(self, extra: Dict[str, torch.Tensor], d: Any, d_state: Any) -> Dict[str, torch.Tensor]:
        return {"count": extra["count"] + 1}

    def sample_loss(self, fake: torch.Tensor, d: Any, d_state: Any, extra: Dict[str, torch.Tensor],
                    inputs: StepInputs) -> torch.Tensor:
        return self.loss(extra["count"], d, inputs.x, fake)


def counting(loss: Callable[..., torch.Tensor]) -> Strategies:
    return Strategies(generator=Counting(loss))


def assert_trees_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_trees_equal(a[k], b[k])
    else:
        assert torch.equal(a, b), "tensors differ"


def records_without_nan(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # NaN != NaN: the step-0 records have no losses yet.
    return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_seed_in_a_vmapped_batch_equals_the_seed_alone() -> None:
    cfg = small(K=2, unroll_lr=1e-3, steps=3)
    together = Trainer(cfg, [0, 4, 7])
    alone = Trainer(cfg, [4])
    for trainer in (together, alone):
        for _ in range(cfg.steps):
            trainer.state, _ = trainer.step_fn(trainer.state, trainer.draw_batch())
    assert_trees_equal(index_state(together.state, 1), index_state(alone.state, 0))
    assert not torch.equal(together.state["g"]["w0"][0], together.state["g"]["w0"][1])


def test_same_seed_same_numbers() -> None:
    cfg = small(K=1, unroll_batches="resampled", loss="nonsaturating")
    first, second = Trainer(cfg, [3]).run(), Trainer(cfg, [3]).run()
    assert records_without_nan(first) == records_without_nan(second)


def test_seeds_are_paired_across_K_and_control() -> None:
    """Seed s starts from the same parameters and sees the same main data stream for every K."""
    configs = [small(K=0), small(K=5, unroll_lr=1e-3), small(K=3, control=True)]
    batches = [Trainer(cfg, [2]).draw_batch() for cfg in configs]
    for batch in batches[1:]:
        assert torch.equal(batch["x"], batches[0]["x"]) and torch.equal(batch["z"], batches[0]["z"])
    assert_trees_equal(init_state(configs[0], 2), init_state(configs[1], 2))


def test_iteration_matches_the_surrogate_written_out() -> None:
    """One vmapped iteration == a D Adam step then a G Adam step on unroll.surrogate_loss, done by hand."""
    cfg = small(K=3, unroll_lr=1e-3)
    trainer = Trainer(cfg, [1])
    batch = trainer.draw_batch()
    new_state, losses = trainer.step_fn(trainer.state, batch)

    state = index_state(trainer.state, 0)
    x, z = batch["x"][0, 0], batch["z"][0, 0]
    d_opt = unroll.adam(cfg.d_lr, betas=(0.5, 0.999))
    g_opt = unroll.adam(cfg.g_lr, betas=(0.5, 0.999))

    def d_loss(d: Dict[str, torch.Tensor], x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return d_loss_from_logits(discriminator_forward(d, x), discriminator_forward(d, fake))

    fake = generator_forward(state["g"], z)
    d_grads = torch.func.grad(d_loss)(state["d"], x, fake)
    d, d_state = d_opt.step(state["d"], d_grads, state["d_opt"])
    surrogate = unroll.surrogate_loss(d_loss, 3, optimizer=unroll.adam(1e-3, betas=(0.5, 0.999)))
    g_grads = torch.func.grad(lambda g: surrogate(d, d_state, x, generator_forward(g, z)))(state["g"])
    g, _ = g_opt.step(state["g"], g_grads, state["g_opt"])
    for name in d:
        torch.testing.assert_close(new_state["d"][name][0], d[name], rtol=1e-5, atol=1e-7)
    for name in g:
        torch.testing.assert_close(new_state["g"][name][0], g[name], rtol=1e-5, atol=1e-7)
    assert torch.isfinite(losses["g_loss"]).all()


def test_unrolling_changes_the_generator_update() -> None:
    state_k0 = Trainer(small(K=0), [0])
    state_k3 = Trainer(small(K=3, unroll_lr=1e-2), [0])
    batch = state_k0.draw_batch()
    g0 = state_k0.step_fn(state_k0.state, batch)[0]["g"]["w2"]
    g3 = state_k3.step_fn(state_k3.state, batch)[0]["g"]["w2"]
    assert not torch.allclose(g0, g3)


def test_control_takes_K_plus_one_discriminator_steps() -> None:
    trainer = Trainer(small(K=3, control=True, steps=2), [0, 1])
    trainer.run()
    assert trainer.state["d_opt"]["step"].tolist() == [8.0, 8.0]
    assert trainer.state["g_opt"]["step"].tolist() == [2.0, 2.0]


def test_a_generator_rule_carries_extra_state() -> None:
    strategies = counting(lambda count, d, x, fake: -d_loss_from_logits(discriminator_forward(d, x),
                                                                   discriminator_forward(d, fake)))
    trainer = Trainer(small(K=2, steps=3, g_steps=2), [0, 1], strategies=strategies)
    trainer.run()
    assert trainer.state["extra"]["count"].tolist() == [3.0, 3.0]
    assert trainer.state["g_opt"]["step"].tolist() == [6.0, 6.0]


class Killed(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = small(K=2, unroll_lr=1e-3, steps=6, unroll_batches="resampled")
    uninterrupted = Trainer(cfg, [0, 1], out_dir=tmp_path / "a")
    uninterrupted.run()

    killed = Trainer(cfg, [0, 1], out_dir=tmp_path / "b")
    draw, calls = killed.draw_batch, [0]

    def dying_draw():
        calls[0] += 1
        if calls[0] == 4:  # after the step-2 checkpoint and one more step: that step is lost
            raise Killed
        return draw()

    killed.draw_batch = dying_draw
    with pytest.raises(Killed):
        killed.run()
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["step"] == 2
    # The figure and the metrics are written at every evaluation, not only at the end.
    assert (tmp_path / "b" / "density.png").is_file()
    assert {r["step"] for r in json.loads((tmp_path / "b" / "metrics.json").read_text())["records"]} == {0, 2}
    resumed = Trainer(cfg, [0, 1], out_dir=tmp_path / "b", resume=True)
    resumed.run()
    assert_trees_equal(resumed.state, uninterrupted.state)
    assert records_without_nan(resumed.records) == records_without_nan(uninterrupted.records)
    assert (tmp_path / "a" / "metrics.csv").read_text() == (tmp_path / "b" / "metrics.csv").read_text()


def test_checkpoints_between_evaluations_lose_at_most_checkpoint_every_iterations(tmp_path: Path) -> None:
    cfg = small(K=1, unroll_lr=1e-3, steps=6, eval_every=6)
    uninterrupted = Trainer(cfg, [0, 1])
    uninterrupted.run()
    killed = Trainer(cfg, [0, 1], out_dir=tmp_path, checkpoint_every=2)
    draw, calls = killed.draw_batch, [0]

    def dying_draw():
        calls[0] += 1
        if calls[0] == 6:  # iteration 6 never ends; the checkpoint of iteration 4 was written
            raise Killed
        return draw()

    killed.draw_batch = dying_draw
    with pytest.raises(Killed):
        killed.run()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 4
    resumed = Trainer(cfg, [0, 1], out_dir=tmp_path, resume=True)
    resumed.run()
    assert_trees_equal(resumed.state, uninterrupted.state)
    assert records_without_nan(resumed.records) == records_without_nan(uninterrupted.records)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    Trainer(small(K=1, steps=2), [0], out_dir=tmp_path).run()
    with pytest.raises(ValueError, match="K: 1 in the run, 2 now"):
        Trainer(small(K=2, steps=2), [0], out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"seeds: \[0\] in the run, \[0, 1\] now"):
        Trainer(small(K=1, steps=2), [0, 1], out_dir=tmp_path, resume=True)
    Trainer(small(K=1, steps=3), [0], out_dir=tmp_path, resume=True).run()  # only the length may change


def test_nan_loss_stops_with_step_and_seed_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    # The loss divides by zero once the per-seed counter reaches 3; seed 9's counter starts ahead.
    strategies = counting(lambda count, d, x, fake: fake.mean() / (3 - count))
    trainer = Trainer(small(steps=6), [5, 9], out_dir=tmp_path, strategies=strategies)
    trainer.state["extra"]["count"][1] = 1.0
    with pytest.raises(runs.Diverged, match=r"iteration 2 for seed 9") as error:
        trainer.run()
    assert error.value.step == 2 and error.value.seed == 9
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["status"] == "diverged" and meta["diverged"]["step"] == 2 and meta["diverged"]["seed"] == 9
    # The checkpoint and the metrics stay at the last evaluation with finite losses (step 0; eval_every=2).
    assert {r["step"] for r in meta["records"]} == {0}
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 0 and all(torch.isfinite(v).all() for v in ckpt["state"]["g"].values())
    assert f"({tmp_path / CHECKPOINT}, iteration 0)" in str(error.value)


def test_a_nonfinite_adam_state_with_finite_losses_is_named_with_its_iteration_and_seed(tmp_path: Path) -> None:
    """Seed 9's generator loss is scaled by 1e30 at iteration 2: the loss stays finite, its squared gradients
    overflow Adam's second moment to inf (and the update to 0, so the parameters stay finite too)."""
    strategies = counting(lambda count, d, x, fake: fake.mean() * torch.where(count == 3, 1e30, 1.0))
    trainer = Trainer(small(steps=6, eval_every=3), [5, 9], out_dir=tmp_path, strategies=strategies)
    trainer.state["extra"]["count"][1] = 1.0
    with pytest.raises(runs.Diverged, match=r"generator Adam state \(exp_avg_sq\..*\) \(inf\) at iteration 2 "
                                               r"for seed 9") as error:
        trainer.run()
    assert (error.value.step, error.value.seed) == (2, 9)
    meta = json.loads((tmp_path / "metrics.json").read_text())
    assert meta["diverged"]["step"] == 2 and meta["diverged"]["seed"] == 9


def test_end_to_end_script_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = mixture.main(["--K", "1", "--unroll-lr", "1e-3", "--steps", "4", "--eval-every", "2", "--seeds", "0-1",
                         "--batch", "64", "--eval-samples", "400", "--out", str(out), "--no-progress"])
    assert code == 0
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["status"] == "done" and meta["config"]["K"] == 1 and meta["seeds"] == [0, 1]
    assert [(r["step"], r["seed"]) for r in meta["records"]] == [(s, seed) for s in (0, 2, 4) for seed in (0, 1)]
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {"hq", "modes", "modes_strict", "reverse_kl", "energy"} <= set(rows[0])
    assert (out / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / CHECKPOINT).exists() and not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    printed = capsys.readouterr().out
    # Strict modes and HQ lead: a diffuse cloud covers every mode by the lenient count.
    assert printed.startswith("step 4, mean over 2 seeds: ") and printed.index("(strict)") < printed.index("lenient")
    # Strict JSON: the step-0 losses (none yet) are null, never NaN.
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text and meta["records"][0]["d_loss"] is None
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))


@pytest.mark.parametrize("flags, message", [
    (["--K", "-1"], "K must be >= 0"),
    (["--seeds", "1,1"], "distinct"),
    (["--seeds", "a"], "invalid literal"),
    (["--unroll-lr", "0"], "learning rates"),
    (["--steps", "0"], "steps"),
    (["--control", "--stop-grad"], "control"),
    (["--dataset", "moons"], "invalid choice"),
    (["--threads", "0"], "argument --threads: must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--seeds", "0-1000000000"], "at most 1,000 are trained at once"),
])
def test_bad_flags_are_argparse_errors(flags: List[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mixture.parse_args(flags + ["--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mixture.main(["--resume", "--out", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint to continue" in capsys.readouterr().err
    Trainer(small(steps=2), [0], out_dir=tmp_path).run()
    assert mixture.main(["--out", str(tmp_path)]) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_sweep_writes_the_report_and_resumes(tmp_path: Path) -> None:
    flags = ["--datasets", "ring", "--ks", "0", "--control-ks", "1", "--seeds", "0-1", "--steps", "2",
             "--sens-seeds", "0-1", "--sens-steps", "2", "--eval-every", "1", "--batch", "32", "--eval-samples", "200",
             "--quick", "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "mixture.md"),
             "--fig-dir", str(tmp_path / "fig"), "--no-progress"]
    assert sweep_mixture.main(flags) == 0
    report = (tmp_path / "mixture.md").read_text()
    assert "Status: **complete**" in report and "| K=0 | 2 |" in report and "control (2 D steps)" in report
    assert (tmp_path / "fig" / "mixture_ring.png").exists()
    # Notes between the markers survive a re-run, and finished cells are not trained again.
    (tmp_path / "mixture.md").write_text(report.replace("<!-- notes -->", "<!-- notes -->hand-written"))
    log_before = json.loads((tmp_path / "runs" / "sweep_log.json").read_text())
    assert sweep_mixture.main(flags) == 0
    assert "<!-- notes -->hand-written<!-- /notes -->" in (tmp_path / "mixture.md").read_text()
    assert json.loads((tmp_path / "runs" / "sweep_log.json").read_text()) == log_before


def test_sweep_sections_horizons_cost_and_per_seed_numbers(tmp_path: Path) -> None:
    """One table per (dataset, activation, mode weights); coverage at the horizons the runs reach; every row's cost
    timed against K = 0's; every evaluation of every seed in per_seed.json."""
    flags = ["--datasets", "ring", "--activations", "relu", "tanh", "--weight-stds", "0", "0.12", "--ks", "0",
             "--control-ks", "1", "--seeds", "0-1", "--steps", "4", "--eval-every", "2", "--horizons", "2", "6",
             "--batch", "16",
             "--eval-samples", "100", "--d-lr", "1e-3", "--g-lr", "1e-3", "--no-sensitivity",
             "--timing-iterations", "1", "--timing-rounds", "1", "--out", str(tmp_path / "runs"),
             "--doc", str(tmp_path / "mixture.md"), "--fig-dir", str(tmp_path / "fig"), "--no-progress"]
    assert sweep_mixture.main(flags) == 0
    report = (tmp_path / "mixture.md").read_text()
    titles = [line for line in report.splitlines() if line.startswith("## Paper ring")]
    assert len(titles) == 4 and "non-uniform mode weights (std 0.12, weight seed 0), tanh generator" in titles[-1]
    assert "| run | at 2 | at 4 |" in report and "| 1.00× |" in report and "Sensitivity" not in report
    assert sorted(p.name for p in (tmp_path / "fig").glob("*.png")) == [
        "mixture_ring.png", "mixture_ring_tanh.png", "mixture_ring_wstd0.12.png", "mixture_ring_wstd0.12_tanh.png"]
    numbers = json.loads((tmp_path / "fig" / "per_seed.json").read_text())
    assert len(numbers["sections"]) == 4
    for section in numbers["sections"]:
        labels = [row["label"] for row in section["rows"]]
        assert labels == ["K=0", "control (2 D steps)"]
        for row in section["rows"]:
            assert row["config"]["d_lr"] == 1e-3 and row["cost_vs_plain"] > 0
            assert sorted({(r["step"], r["seed"]) for r in row["records"]}) == [
                (step, seed) for step in (0, 2, 4) for seed in (0, 1)]
            assert set(row["stable_coverage"]) == {"0", "1"}
