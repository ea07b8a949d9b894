"""Peak memory of one gradient computation: peak RSS growth in a fresh subprocess per method (CPU), or the CUDA
caching allocator's peak in-process (CUDA).

torch's CPU tensors are allocated with malloc, invisible to tracemalloc, and torch keeps no CPU allocator
statistics, so we measure the process: in a child process (one per method, one thread) we warm the
method up, reset the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), note the current RSS, run one
gradient computation, and report ``VmHWM - VmRSS_before``: how far the resident set rose above what the
models, data and Adam state already held. The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every
block of 64 KiB or more is mmapped and handed back to the kernel when freed; without it glibc keeps freed
memory around after the warm-up and the second call would reuse it unseen. Linux only.

On CUDA the allocator counts every tensor: after the same warm-up, ``torch.cuda.reset_peak_memory_stats`` and
``max_memory_allocated - memory_allocated`` give the same quantity without a subprocess.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def supported(device: str = "cpu") -> Optional[str]:
    """None if peak memory can be measured on ``device`` here, else the reason it cannot."""
    if _is_cuda(device):
        return None
    if not Path("/proc/self/status").exists():
        return "needs Linux /proc (VmHWM, clear_refs)"
    try:
        CLEAR_REFS.write_text("5")
    except OSError as error:
        return f"cannot reset the peak RSS mark ({error})"
    return None


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def peak_growth_bytes(run: Callable[[], object], warm_up: Callable[[], object]) -> int:
    """Bytes by which the peak RSS of one ``run()`` exceeds the RSS just before it (after ``warm_up()``)."""
    warm_up()
    gc.collect()
    CLEAR_REFS.write_text("5")  # the peak mark restarts from the current RSS
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    del result
    return (peak - before) * 1024


def cuda_peak_growth_bytes(run: Callable[[], object], warm_up: Callable[[], object]) -> int:
    """Bytes by which CUDA's peak allocation during one ``run()`` exceeds the allocation just before it."""
    warm_up()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return peak - before


def _peaks(models: Sequence[str], method: str, ks: Sequence[int], seed: int, device: str
           ) -> Dict[str, Dict[int, int]]:
    """``{model: {K: peak growth}}`` of ``method`` in this process, each model warmed up first."""
    from .methods import make, warm_up
    from .models import make_problem

    peak_growth = cuda_peak_growth_bytes if _is_cuda(device) else peak_growth_bytes
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
    if _is_cuda(device):
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
