r"""Binomial checkpointing: which unrolled states to keep so that at most N are stored at once.

Reversing K steps whose forward pass kept only some states means recomputing the others from the nearest kept
one. Griewank & Walther ("Algorithm 799: revolve", ACM TOMS 26(1), 2000) show that with N stored states the fewest
forward steps needed to reverse l steps are

.. math:: A(l, N) = r\,l - \binom{N + r}{r - 1}, \qquad
          r = \min\{\, r : \tbinom{N + r}{N} \ge l \,\},

reached by advancing ``m`` steps, storing that state, reversing the last ``l - m`` steps with ``N - 1`` states
left, then the first ``m`` with all ``N``. ``r`` is the number of times the most-recomputed step runs: memory
O(N) buys time O(r K) with :math:`K \le \binom{N + r}{N}`, i.e. r grows like :math:`K^{1/N}` (N fixed) or
:math:`\log K` (N of order :math:`\log K`).

The plan is a tree of segments. The top level is the forward pass: its segments' first states are stored as it
goes. A segment of several steps is reversed by advancing from its first state through all its parts but the
last, storing each part's first state, then reversing the parts last to first; a segment of one step is
reversed by running that step once more, recording its graph. Its parts are its first ``m`` steps (the same
budget) and the rest, split again with one state fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class Segment:
    """``steps`` consecutive steps; ``parts`` are the consecutive segments they are reversed by (none: one step)."""

    steps: int
    parts: Tuple[Segment, ...] = ()


STEP = Segment(1)


def repetitions(steps: int, slots: int) -> int:
    """The smallest r with ``comb(slots + r, slots) >= steps``: how often the most-recomputed step runs."""
    r = 0
    while math.comb(slots + r, slots) < steps:
        r += 1
    return r


def min_advances(steps: int, slots: int) -> int:
    """:math:`A(l, N)`, the fewest forward steps that reverse ``steps`` steps with ``slots`` stored states besides
    the first (Griewank & Walther 2000); ``steps`` ≥ 1, ``slots`` ≥ 1 (or any ``slots`` for one step)."""
    if steps == 1:
        return 0
    r = repetitions(steps, slots)
    return r * steps - math.comb(slots + r, r - 1)


def split(steps: int, slots: int) -> int:
    """An optimal first stored state ``m`` (1 ≤ m < steps): minimises ``m + A(m, N) + A(steps - m, N - 1)``.

    That sum is convex in ``m`` (``A(·, N)`` is piecewise linear with slopes ``r`` that grow with the length), so
    a binary search on its forward difference finds the smallest minimiser.
    """
    if slots == 1:
        return steps - 1  # no state left after this one: only one step may follow it

    def cost(m: int) -> int:
        return m + min_advances(m, slots) + min_advances(steps - m, slots - 1)

    low, high = 1, steps - 1
    while low < high:
        middle = (low + high) // 2
        if cost(middle + 1) < cost(middle):
            low = middle + 1
        else:
            high = middle
    return low


def plan(steps: int, slots: int) -> Segment:
    """The schedule of ``steps`` ≥ 1 steps storing at most ``slots`` ≥ 1 states besides the first; with
    ``slots >= steps - 1`` every state is stored and each step is recomputed once."""
    if steps == 1:
        return STEP
    if slots >= steps - 1:
        return Segment(steps, (STEP,) * steps)
    parts: List[Segment] = []
    left = steps
    while left > 1 and slots > 0:
        first = split(left, slots)
        parts.append(plan(first, slots))
        left, slots = left - first, slots - 1
    parts.append(STEP)  # the budget runs out exactly where one step is left (see split)
    return Segment(steps, tuple(parts))


def stored_positions(schedule: Segment, step: int) -> List[int]:
    """The states (by step index, 0 = the first) stored while ``step`` is being reversed: the first states of the
    parts that precede or contain it, at every level of the tree on the way down to it."""
    positions, start, segment = [0], 0, schedule
    while segment.parts:
        for part in segment.parts:
            if step < start + part.steps:
                segment = part
                break
            start += part.steps
            positions.append(start)
        else:
            raise IndexError(f"step {step} is outside a schedule of {schedule.steps} steps")
    return positions


def forward_steps(schedule: Segment) -> int:
    """Steps run in all, the first forward pass included: each step once, then during the backward pass the
    advances of every segment below the top level and one more run of each step (to record its graph)."""
    return schedule.steps + sum(_reversal(part) for part in schedule.parts) if schedule.parts else 2


def _reversal(segment: Segment) -> int:
    if not segment.parts:
        return 1
    return segment.steps - segment.parts[-1].steps + sum(_reversal(part) for part in segment.parts)


def most_stored(schedule: Segment) -> int:
    """The most states stored at once besides the first, over the whole reversal."""
    return max(len(stored_positions(schedule, k)) for k in range(schedule.steps)) - 1
