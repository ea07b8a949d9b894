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

The benchmarks' driver (a fresh interpreter per method) is ``benchmarks/memory.py``; the example scripts call
:func:`peak_growth_bytes` in subprocesses of their own.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Callable, Optional

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def supported(device: str = "cpu") -> Optional[str]:
    """None if peak memory can be measured on ``device`` here, else the reason it cannot."""
    if is_cuda(device):
        return None
    if not Path("/proc/self/status").exists():
        return "needs Linux /proc (VmHWM, clear_refs)"
    try:
        CLEAR_REFS.write_text("5")
    except OSError as error:
        return f"cannot reset the peak RSS mark ({error})"
    return None


def is_cuda(device: str) -> bool:
    """Whether ``device`` is a CUDA device (measured in-process with the allocator's statistics)."""
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
