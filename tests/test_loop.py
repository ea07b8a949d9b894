"""The one training loop (examples/unroll_examples/loop.py): when it iterates, evaluates and checkpoints, and that a
run resumed from any checkpoint makes exactly the calls an uninterrupted run makes after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unroll_examples import image_training as it
from unroll_examples import loop, runs
from unroll_examples.training import TrainConfig, Trainer


class Recorder:
    """A :class:`loop.Run` that records what the loop asks of it; ``fail_at``: the iteration whose step raises."""

    def __init__(self, step: int = 0, fail_at: Optional[int] = None) -> None:
        self.step, self.train_seconds, self.fail_at = step, 0.0, fail_at
        self.calls: List[Tuple[str, int]] = []
        self.checkpoints: List[Tuple[int, bool, bool]] = []

    def iterate(self) -> None:
        if self.step + 1 == self.fail_at:
            raise runs.Diverged(self.step + 1, 0, "loss", float("nan"), None, None)
        self.calls.append(("iterate", self.step + 1))

    def evaluate(self) -> None:
        self.calls.append(("evaluate", self.step))

    def checkpoint(self, evaluated: bool, done: bool) -> None:
        self.calls.append(("checkpoint", self.step))
        self.checkpoints.append((self.step, evaluated, done))

    def postfix(self) -> Dict[str, str]:
        return {}


def expected_calls(start: int, steps: int, eval_every: int, checkpoint_every: int) -> List[Tuple[str, int]]:
    """The schedule written out independently: evaluate at 0, every eval_every and at the end; checkpoint then
    and every checkpoint_every."""
    calls: List[Tuple[str, int]] = [("evaluate", 0), ("checkpoint", 0)] if start == 0 else []
    for step in range(start + 1, steps + 1):
        calls.append(("iterate", step))
        evaluated = step % eval_every == 0 or step == steps
        if evaluated:
            calls.append(("evaluate", step))
        if evaluated or step % checkpoint_every == 0:
            calls.append(("checkpoint", step))
    return calls


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 30), eval_every=st.integers(1, 12), checkpoint_every=st.integers(1, 12))
def test_the_schedule_evaluates_and_checkpoints_where_it_says(steps: int, eval_every: int,
                                                              checkpoint_every: int) -> None:
    run = Recorder()
    loop.train(run, steps, eval_every, checkpoint_every)
    assert run.calls == expected_calls(0, steps, eval_every, checkpoint_every)
    assert run.step == steps and run.train_seconds >= 0
    assert run.checkpoints[-1] == (steps, True, True)
    assert [done for _, _, done in run.checkpoints].count(True) == 1


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(2, 30), eval_every=st.integers(1, 12), checkpoint_every=st.integers(1, 12),
       data=st.data())
def test_a_run_resumed_from_any_checkpoint_continues_the_uninterrupted_schedule(
        steps: int, eval_every: int, checkpoint_every: int, data: st.DataObject) -> None:
    whole = Recorder()
    loop.train(whole, steps, eval_every, checkpoint_every)
    resumed_at = data.draw(st.sampled_from([s for s, _, _ in whole.checkpoints if s < steps] or [0]))
    resumed = Recorder(step=resumed_at)
    loop.train(resumed, steps, eval_every, checkpoint_every)
    after = whole.calls[whole.calls.index(("checkpoint", resumed_at)) + 1:]
    assert resumed.calls == (after if resumed_at else whole.calls)


def test_a_diverged_iteration_stops_the_loop_before_anything_is_stored() -> None:
    run = Recorder(fail_at=5)
    with pytest.raises(runs.Diverged, match="iteration 5"):
        loop.train(run, 10, eval_every=2, checkpoint_every=3)
    assert run.step == 4 and max(step for step, _, _ in run.checkpoints) == 4
    assert ("iterate", 5) not in run.calls


def test_a_finished_run_is_not_trained_or_evaluated_again() -> None:
    run = Recorder(step=6)
    loop.train(run, 6, eval_every=2, checkpoint_every=3)
    assert run.calls == []


# ----- the trainers under the loop: a kill between a finished run's export and its last checkpoint -----


def _die_after_the_last(monkeypatch: pytest.MonkeyPatch, what: str, trainer_cls: type, save: str, steps: int) -> None:
    """The process dies right after writing, at the last iteration, ``what``: the run's last checkpoint (the
    trainer's ``save`` method) or its export (``runs.write_final``)."""
    if what == "checkpoint":
        original = getattr(trainer_cls, save)

        def checkpoint_then_die(self: Any) -> None:
            original(self)
            if self.step == steps:
                raise KeyboardInterrupt

        monkeypatch.setattr(trainer_cls, save, checkpoint_then_die)
    else:
        write_final = runs.write_final

        def export_then_die(path: Path, checkpoint: runs.Checkpoint) -> None:
            write_final(path, checkpoint)
            raise KeyboardInterrupt

        monkeypatch.setattr(runs, "write_final", export_then_die)


@pytest.mark.parametrize("what", ["checkpoint", "export"])
def test_a_mixture_run_killed_at_its_end_finishes_with_its_export_on_resume(what: str, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(K=1, batch=16, steps=4, eval_every=2, eval_samples=200)
    Trainer(cfg, [0, 1], out_dir=tmp_path / "whole").run()
    with monkeypatch.context() as patch:
        _die_after_the_last(patch, what, Trainer, "_save_checkpoint", cfg.steps)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg, [0, 1], out_dir=tmp_path / "part").run()
    Trainer(cfg, [0, 1], out_dir=tmp_path / "part", resume=True).run()
    assert (tmp_path / "part" / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
    a, b = (runs.read_final(tmp_path / name / runs.FINAL) for name in ("whole", "part"))
    assert a.step == b.step == 4 and all(torch.equal(a.state["g"][k], b.state["g"][k]) for k in a.state["g"])


@pytest.mark.parametrize("what", ["checkpoint", "export"])
def test_an_image_run_killed_at_its_end_finishes_with_its_export_on_resume(what: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from test_image_gans import tiny_gan

    cfg = it.GANConfig(K=1, batch=4, steps=4, snapshot_every=2, checkpoint_every=3)
    whole = it.GANTrainer(tiny_gan(), cfg, tmp_path / "whole")
    whole.run()
    with monkeypatch.context() as patch:
        _die_after_the_last(patch, what, it.GANTrainer, "save_checkpoint", cfg.steps)
        with pytest.raises(KeyboardInterrupt):
            it.GANTrainer(tiny_gan(), cfg, tmp_path / "part").run()
    resumed = it.GANTrainer(tiny_gan(), cfg, tmp_path / "part", resume=True)
    resumed.run()
    assert resumed.losses == whole.losses
    a, b = (runs.read_final(tmp_path / name / runs.FINAL) for name in ("whole", "part"))
    assert a.step == b.step == 4 and all(torch.equal(a.state["G"][k], b.state["G"][k]) for k in a.state["G"])
