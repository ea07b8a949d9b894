"""Side-by-side cost measurements: what makes a control "cost-matched".

Costs are compared only when they are measured in one process, interleaved, so that the load of a shared machine
falls on every candidate alike; the median over rounds drops the bursts.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping

import numpy as np


def interleaved_seconds(steps: Mapping[str, Callable[[], None]], iterations: int, rounds: int, warmup: int = 1,
                        synchronize: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Seconds per call of every ``steps[name]()``: the median over ``rounds`` rounds of ``iterations`` calls each,
    the steps interleaved within a round, after ``warmup`` untimed calls (first-call overheads). ``synchronize``
    waits for queued device work (``torch.cuda.synchronize`` on a GPU) before each clock reading."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            synchronize()
            start = time.perf_counter()
            for _ in range(iterations):
                step()
            synchronize()
            samples[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(values) for name, values in samples.items()}


def matched_count(costs: Mapping[int, float], target: float) -> int:
    """The count n (e.g. of committed discriminator steps) whose cost is closest to ``target``, from a least-squares
    line through the measured ``costs`` (n -> seconds; at least two counts), rounded; at least 1."""
    if len(costs) < 2:
        raise ValueError(f"a cost line needs at least two measured counts, got {sorted(costs)}")
    slope, intercept = np.polyfit(np.array(list(costs), dtype=float), np.array(list(costs.values())), 1)
    if not slope > 0:
        raise ValueError(f"the measured cost does not grow with the count (slope {slope:.3g} s): time more rounds")
    return max(1, int(round((target - intercept) / slope)))
