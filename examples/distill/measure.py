"""Time per outer step and peak memory growth of distill.py's outer step, with and without the checkpoint budget
and with a RaT-BPTT window.

Each setting runs in a fresh interpreter (one thread, glibc told to hand freed blocks of 64 KiB or more back to
the kernel): one warm-up outer step, then the peak RSS growth of one more (``benchmarks/memory.py``'s method:
reset the kernel's peak mark, note the RSS, run, read VmHWM), then the mean time of ``--repeats`` further steps.

    python examples/distill/measure.py     # a few minutes; writes runs/distill/measure/{measure.json,measure.md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import distill  # this folder's script
from unroll_examples import runs
from unroll_examples.cli import positive_int
from unroll_examples.memory import PROBE_ENV, peak_growth_bytes, supported

HERE = Path(__file__).resolve().parent

# At K = 100 and the main runs' outer batch: checkpoint 0 is the plain unroll, 100 (>= K) stores every step's state
# and recomputes each step once, 10 is the default budget (binomial checkpointing: more recomputation, less memory).
SETTINGS = [dict(ipc=1, checkpoint=0), dict(ipc=1, checkpoint=100), dict(ipc=1, checkpoint=10),
            dict(ipc=10, checkpoint=0), dict(ipc=10, checkpoint=10),
            dict(ipc=10, checkpoint=0, window=20), dict(ipc=10, checkpoint=10, window=20)]


def probe(overrides: Dict[str, Any], repeats: int) -> Dict[str, float]:
    """In this (fresh) process: peak RSS growth of one outer step and the mean seconds of ``repeats`` more."""
    torch.set_num_threads(1)
    cfg = distill.Config(**overrides)
    data = distill.load_data(cfg.limit)
    dist = distill.Distillation.start(cfg)
    peak = peak_growth_bytes(lambda: distill.outer_step(cfg, dist, data, 1),
                             warm_up=lambda: distill.outer_step(cfg, dist, data, 0))
    t0 = time.perf_counter()
    for step in range(2, 2 + repeats):
        distill.outer_step(cfg, dist, data, step)
    return {"peak_rss_growth_mib": peak / 2**20, "seconds_per_outer_step": (time.perf_counter() - t0) / repeats}


def measure(overrides: Dict[str, Any], repeats: int) -> Dict[str, float]:
    env = {**os.environ, **PROBE_ENV}
    cmd = [sys.executable, __file__, "--probe", json.dumps(overrides), "--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {overrides} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(results: Sequence[Dict[str, Any]], K: int) -> str:
    lines = ["| images | K | checkpoint | window | s / outer step | peak RSS growth (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {10 * r['ipc']} | {K} | {r.get('checkpoint', 0) or 'off'} | {r.get('window', 0) or 'all K'} | "
                     f"{r['seconds_per_outer_step']:.2f} | {r['peak_rss_growth_mib']:.1f} |")
    return "\n".join(lines)


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed outer steps per setting")
    p.add_argument("--out", default="runs/distill/measure", help="output folder")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one setting, in a child process
    args = p.parse_args(argv)
    if args.probe is not None:
        print(json.dumps(probe(json.loads(args.probe), args.repeats)))
        return 0
    reason = supported("cpu")
    if reason:
        raise runs.RunError(f"cannot measure peak memory here: {reason}")
    results: List[Dict[str, Any]] = []
    with runs.claim(Path(args.out), resume=None):
        for overrides in SETTINGS:
            results.append({**overrides, **measure(overrides, args.repeats)})
            print(results[-1], flush=True)
        table = markdown(results, distill.Config.K)
        runs.write_json(Path(args.out) / "measure.json", {"config": dataclasses.asdict(distill.Config()),
                                                          "repeats": args.repeats, "results": results,
                                                          "table": table})
        (Path(args.out) / "measure.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
