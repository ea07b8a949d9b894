"""N seeds of the mixture GAN in one process (torch.func.vmap over stacked parameters) vs N separate runs.

    python -m benchmarks.vmap_seeds                 # N = 10 seeds, 20 iterations of K = 5, 1 thread

The training loop is the mixture experiment's (``examples/unroll_examples/training.py``, App. A: batch 512, Adam, K
unrolled
discriminator steps). One repetition times ``iterations`` training iterations (``draw_batch`` + ``step_fn``, no
evaluation) of

- **vmap**: one ``Trainer(cfg, seeds)``: all N seeds stacked and ``torch.func.vmap``-ed, as the sweep runs them;
- **separate**: N single-seed runs, one after the other: the pure iteration ``make_iteration(cfg)`` without
  vmap on each seed's own (unstacked) state and batches, the least a run of one seed can do;
- **separate Trainer**: N ``Trainer(cfg, [seed])``, what running the sweep one seed at a time costs. A one-seed
  Trainer vmaps its seed next to a copy of itself (so that it gets the numbers it gets in a batch), i.e. it
  does twice the arithmetic; shown for reference, the target (N = 10 vmapped seeds in <= 0.5x the time of
  **separate**) uses **separate**.

The three are interleaved (the first rotates), after one untimed warm-up iteration of each, and each
repetition starts from fresh trainers built outside the timed region; the page reports medians. All three train
the same seeds from the same data streams, and the final parameters are compared: vmap and separate Trainer
must be equal, the un-vmapped runs equal up to the last bits of different reduction kernels.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

TARGET = 0.5  # vmap time / separate time, for N = TARGET_SEEDS
TARGET_SEEDS = 10


@dataclass(frozen=True)
class SeedsConfig:
    seeds: int = 10
    iterations: int = 20
    K: int = 5
    batch: int = 512  # App. A
    reps: int = 3
    threads: int = 1


QUICK_SEEDS = SeedsConfig(seeds=2, iterations=2, K=1, batch=32, reps=1)


def _training() -> ModuleType:
    """``examples/unroll_examples/training.py``, imported when a runner is built (not by ``--help``)."""
    from unroll_examples import training

    return training


def runners(config: SeedsConfig) -> Dict[str, Callable[[], Any]]:
    """Fresh (untimed) set-up of each way; each returned function trains and returns the seeds' final G params."""
    training = _training()
    cfg = training.TrainConfig(K=config.K, batch=config.batch, steps=config.iterations,
                               eval_every=config.iterations, eval_samples=100)
    seeds = list(range(config.seeds))

    def train(trainer: Any) -> Any:
        for _ in range(config.iterations):
            trainer.state, _ = trainer.step_fn(trainer.state, trainer.draw_batch())
        return trainer.state

    together = training.Trainer(cfg, seeds)
    alone = [training.Trainer(cfg, [s]) for s in seeds]
    iteration = training.make_iteration(cfg)
    plain = [(training.Trainer(cfg, [s]), training.init_state(cfg, s)) for s in seeds]

    def vmap() -> List[Dict[str, torch.Tensor]]:
        state = train(together)
        return [training.index_state(state["g"], i) for i in seeds]

    def separate_trainer() -> List[Dict[str, torch.Tensor]]:
        return [training.index_state(train(trainer)["g"], 0) for trainer in alone]

    def separate() -> List[Dict[str, torch.Tensor]]:
        out = []
        for streams, state in plain:  # the one-seed Trainer only supplies that seed's data stream here
            for _ in range(config.iterations):
                state, _ = iteration(state, training.index_state(streams.draw_batch(), 0))
            out.append(state["g"])
        return out

    return {"vmap": vmap, "separate": separate, "separate_trainer": separate_trainer}


def _max_diff(a: Sequence[Dict[str, torch.Tensor]], b: Sequence[Dict[str, torch.Tensor]]) -> float:
    return max(float((x[name] - y[name]).abs().max()) for x, y in zip(a, b) for name in x)


def measure(config: SeedsConfig = SeedsConfig(), log: Callable[[str], None] = lambda message: None
            ) -> Dict[str, Any]:
    """Seconds per repetition of each way, their medians, the ratio vmap / separate, and the parameter check."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        names = ("vmap", "separate", "separate_trainer")
        times: Dict[str, List[float]] = {name: [] for name in names}
        diffs: Dict[str, float] = {}
        for run in runners(replace(config, iterations=1)).values():
            run()  # warm-up: the first vmapped call in a process is slow (about a second)
        for rep in range(config.reps):
            runs = runners(config)
            results = {}
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                start = time.perf_counter()
                results[name] = runs[name]()
                times[name].append(time.perf_counter() - start)
            if rep == 0:
                diffs = {name: _max_diff(results[name], results["vmap"]) for name in names[1:]}
            log(f"[vmap seeds] rep {rep + 1}/{config.reps}: " +
                ", ".join(f"{name} {times[name][-1]:.2f} s" for name in names))
    finally:
        torch.set_num_threads(threads_before)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = medians["vmap"] / medians["separate"]
    return {"config": asdict(config), "times_s": times, "median_s": medians, "ratio": ratio,
            "ratio_trainer": medians["vmap"] / medians["separate_trainer"],
            "max_abs_diff": diffs, "ok": ratio <= TARGET if config.seeds == TARGET_SEEDS else None}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vmap_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SeedsConfig()
    for field in ("seeds", "iterations", "K", "batch", "reps", "threads"):
        parser.add_argument(f"--{field.lower()}", type=int, default=getattr(defaults, field), dest=field)
    args = parser.parse_args(argv)
    config = SeedsConfig(**{f: getattr(args, f) for f in ("seeds", "iterations", "K", "batch", "reps", "threads")})
    result = measure(config, log=lambda message: print(message, file=sys.stderr))
    m = result["median_s"]
    print(f"{config.seeds} seeds x {config.iterations} iterations, K={config.K}, batch {config.batch}, "
          f"{config.threads} thread(s), median of {config.reps}: vmap {m['vmap']:.2f} s, separate "
          f"{m['separate']:.2f} s, separate Trainer {m['separate_trainer']:.2f} s; vmap / separate = "
          f"{result['ratio']:.2f}x (target <= {TARGET}x), vmap / separate Trainer = {result['ratio_trainer']:.2f}x; "
          f"max |param diff| vs vmap: " + ", ".join(f"{k} {v:.1e}" for k, v in result["max_abs_diff"].items()))
    return result


if __name__ == "__main__":
    main()
