"""The one training loop every GAN experiment runs: the 2-D mixtures (:class:`training.Trainer`, seeds vmapped) and
the image GANs (:class:`image_training.GANTrainer`, modules with BatchNorm), in one process or data-parallel.

What an experiment does in one iteration, how it evaluates and what it checkpoints is its own (a :class:`Run`); when
each happens is decided here, once::

    evaluate at iteration 0 (a fresh run)
    while step < steps:
        one iteration (timed)                  -> raises runs.Diverged before anything bad is stored
        every eval_every iterations, and at the last: evaluate
        then, and every checkpoint_every iterations: checkpoint (atomically, through runs)

so a run killed at any moment resumes from its last checkpoint and ends with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import time
from typing import Dict, Protocol


class Run(Protocol):
    """What :func:`train` drives. ``step`` counts finished iterations and ``train_seconds`` their time; both are
    saved in the run's checkpoints, so they continue across a resume."""

    step: int
    train_seconds: float

    def iterate(self) -> None:
        """One training iteration (raises :class:`runs.Diverged` on a NaN or infinity, before storing it)."""

    def evaluate(self) -> None:
        """Measure the run at ``step`` (metrics, sample snapshots)."""

    def checkpoint(self, evaluated: bool, done: bool) -> None:
        """Save the state at ``step``; ``evaluated``: an evaluation was just taken (write the outputs that show
        it); ``done``: the last iteration."""

    def postfix(self) -> Dict[str, str]:
        """What the progress bar shows after an evaluation."""


def train(run: Run, steps: int, eval_every: int, checkpoint_every: int, desc: str = "", progress: bool = False
          ) -> None:
    """Train ``run`` from its current ``step`` to ``steps`` iterations: evaluate at iteration 0 of a fresh run,
    every ``eval_every`` iterations and at the last; checkpoint at each evaluation and every ``checkpoint_every``
    iterations."""
    from tqdm import tqdm

    if run.step == 0:
        run.evaluate()
        run.checkpoint(evaluated=True, done=False)
    bar = tqdm(total=steps, initial=min(run.step, steps), disable=not progress, dynamic_ncols=True, desc=desc,
               mininterval=1.0)
    bar.set_postfix(run.postfix())
    try:
        while run.step < steps:
            start = time.perf_counter()
            run.iterate()
            run.train_seconds += time.perf_counter() - start
            run.step += 1
            bar.update(1)
            evaluation = run.step % eval_every == 0 or run.step == steps
            if evaluation:
                run.evaluate()
                bar.set_postfix(run.postfix())
            if evaluation or run.step % checkpoint_every == 0:
                run.checkpoint(evaluated=evaluation, done=run.step == steps)
    finally:
        bar.close()
