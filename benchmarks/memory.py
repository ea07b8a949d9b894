"""The benchmarks' peak-memory driver: each method's gradient in a fresh interpreter per method (CPU), or in-process
(CUDA), measured with the probe of ``examples/unroll_examples/memory.py`` (method and caveats there)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from unroll_examples.memory import PROBE_ENV, cuda_peak_growth_bytes, is_cuda, peak_growth_bytes, supported

__all__ = ["PROBE_ENV", "cuda_peak_growth_bytes", "measure", "peak_growth_bytes", "probe", "supported"]


def _peaks(models: Sequence[str], method: str, ks: Sequence[int], seed: int, device: str
           ) -> Dict[str, Dict[int, int]]:
    """``{model: {K: peak growth}}`` of ``method`` in this process, each model warmed up first."""
    from .methods import make, warm_up
    from .models import make_problem

    peak_growth = cuda_peak_growth_bytes if is_cuda(device) else peak_growth_bytes
    out: Dict[str, Dict[int, int]] = {}
    for model in models:
        problem = make_problem(model, seed, device)
        # One-off costs (kernel selection, lazily built autograd state) belong to no K: pay them first.
        warm_method, warm_k = warm_up(method)
        warm = make(warm_method, problem, warm_k)
        out[model] = {}
        for K in ks:
            out[model][K] = peak_growth(make(method, problem, K), warm)
            gc.collect()
    return out


def probe(models: Sequence[str], method: str, ks: Sequence[int], seed: int) -> Dict[str, Dict[int, int]]:
    """In this (child) process, 1 thread: ``{model: {K: peak RSS growth}}`` of ``method``."""
    torch.set_num_threads(1)
    return _peaks(models, method, ks, seed, "cpu")


def measure(models: Sequence[str], method: str, ks: Sequence[int], seed: int, device: str = "cpu"
            ) -> Dict[str, Dict[int, int]]:
    """``{model: {K: peak growth in bytes}}``: :func:`probe` in a fresh interpreter, or in-process on CUDA."""
    if is_cuda(device):
        return _peaks(models, method, ks, seed, device)
    env = {**os.environ, **PROBE_ENV}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.memory", ",".join(models), method, str(seed)] + [str(k) for k in ks]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {method} failed:\n{done.stderr[-2000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {model: {int(k): int(v) for k, v in per_k.items()} for model, per_k in raw.items()}


def _main(argv: List[str]) -> None:
    models, method, seed, *ks = argv
    print(json.dumps(probe(models.split(","), method, [int(k) for k in ks], int(seed))))


if __name__ == "__main__":
    _main(sys.argv[1:])
