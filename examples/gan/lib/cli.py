"""Command-line pieces every script shares: a help formatter that shows every default, and ``--seeds`` ranges."""

from __future__ import annotations

import argparse
from typing import List

MAX_SEEDS = 1000
"""The most seeds one ``--seeds`` may name: they are trained at once (vmapped), each with its own parameters,
Adam states and data streams, so a range such as ``0-1000000000`` is refused before anything is allocated."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every flag whose help does not state
    its default already; on/off switches and flags resolved later (default ``None``) state theirs in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is skip for skip in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def parse_seeds(text: str, limit: int = MAX_SEEDS) -> List[int]:
    """``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,7"``) -> distinct non-negative seeds, at most ``limit`` of them
    (checked before a range is expanded)."""
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            low, high = int(lo), int(hi)
            if high < low:
                raise ValueError(f"empty seed range {part!r}")
            if len(seeds) + high - low + 1 > limit:
                raise ValueError(f"--seeds {text!r} names {high - low + 1:,} seeds in {part!r}; at most {limit:,} "
                                 f"are trained at once")
            seeds.extend(range(low, high + 1))
        else:
            seeds.append(int(part))
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {text!r}")
    if len(seeds) > limit:
        raise ValueError(f"--seeds {text!r} names {len(seeds):,} seeds; at most {limit:,} are trained at once")
    return seeds


DEFAULT_THREADS = 1
"""torch's CPU threads per process. One is the fastest for these small models: on the shared 2-core machine,
200 iterations of ``mixture.py --K 5`` (batch 512, 5 seeds) took 154-213 s with one thread and 1,045 s with two
(``examples/gan/README.md`` has the command); the timings in the docs are for one."""


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch.set_num_threads: CPU threads per process (one is the fastest for these small models, "
                        "five times faster than two on a busy 2-core machine; see examples/gan/README.md)")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (anything else is an argparse error naming the value)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_threads(threads: int) -> None:
    """Raise ``ValueError`` unless ``threads >= 1``."""
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
