"""Benchmark one unrolled generator gradient: unroll vs higher vs torchopt vs a first-order loop.

    python -m benchmarks.unrolled_gradient --out docs/benchmarks.md          # full suite (minutes)
    python -m benchmarks.unrolled_gradient --quick                           # smoke run (seconds)
    python -m benchmarks.unrolled_gradient --only truncation --threads 1     # one section
    python -m benchmarks.unrolled_gradient --device cuda --ks 1 5 10 20      # on a GPU

All methods run in one process, interleaved round-robin within each repetition (the starting method rotates),
after warm-up calls; the page reports medians and ratios to unroll, at 1 and 2 threads, the peak memory of
each method (see :mod:`benchmarks.memory`) and a side-check that the gradients agree. Sections: the method
comparison, the checkpointed unroll at K = 100 (memory target: <= 1/5 of the plain unroll's peak), truncated
unrolls (what ``truncate`` saves, and how far its gradient is from the full one) and N seeds with vmap.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from unroll_examples import report

from . import memory, plots, vmap_seeds
from .methods import (
    CHECKPOINT_METHOD,
    METHODS,
    OPTIONAL,
    TORCHOPT_EPS_ROOT,
    GradFn,
    describe,
    make,
    make_unroll,
    unavailable,
    unroll_method,
)
from .models import CONV_BATCH, CONV_D_CHANNELS, CONV_G_CHANNELS, MIXTURE_BATCH, MODELS, STEADY_STEP, make_problem

Log = Callable[[str], None]

SPEED_TARGET = 0.7  # unroll / faster of (higher, torchopt), K >= 5
FIRST_ORDER_TARGET = 3.2  # unroll / first-order, K = 10
FIRST_ORDER_TARGET_K = 10
CHECKPOINT_MEMORY_TARGET = 1 / 5

# What a run measures (--only): the method comparison (timings, memory, correctness and the speed targets),
# the checkpointed unroll at K = 100, truncated unrolls, N seeds with vmap.
SECTIONS = ("comparison", "checkpoint", "truncation", "seeds")
DEVICES = ("cpu", "cuda")
SEEDS_ON_CUDA = ("examples/unroll_examples/training.py's Trainer builds its parameters and draws its batches on the "
                 "CPU "
                 "(it has no device option), so N seeds with vmap are compared on the CPU only")


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    sections: Tuple[str, ...] = SECTIONS
    models: Tuple[str, ...] = MODELS
    methods: Tuple[str, ...] = METHODS
    ks: Tuple[int, ...] = (1, 5, 10, 20)
    threads: Tuple[int, ...] = (1, 2)
    reps: Tuple[Tuple[str, int], ...] = (("mixture", 10), ("conv", 5))  # timed repetitions per model
    warmup: int = 1  # untimed calls of every method before the timed ones
    memory: bool = True
    checkpoint_k: int = 100  # K of the checkpointed-vs-plain memory comparison on the conv model
    seed: int = 0
    tolerance: float = 1e-5  # gradients must agree to this, relative to the largest entry of unroll's
    checkpoint_tolerance: float = 1e-6  # checkpointed and truncate=K gradients equal the plain one to this
    truncation_ks: Tuple[int, ...] = (20, 100)  # K of the truncated unrolls; T in {1, K/2, K}, 1 thread
    truncation_reps: Tuple[Tuple[str, int], ...] = (("mixture", 10), ("conv", 3))  # conv at K = 100: ~15 s a round
    seeds: Optional[vmap_seeds.SeedsConfig] = vmap_seeds.SeedsConfig()  # N seeds vmapped vs separate; None: skip
    # The same at a batch where per-operation overhead dominates: shows where vmap pays (not a target).
    seeds_small_batch: Optional[vmap_seeds.SeedsConfig] = vmap_seeds.SeedsConfig(batch=64)

    def reps_for(self, model: str) -> int:
        return dict(self.reps)[model]


QUICK = Config(ks=(1, 2), threads=(1,), reps=(("mixture", 3), ("conv", 1)), checkpoint_k=4,
               truncation_ks=(4,), truncation_reps=(("mixture", 2), ("conv", 1)),
               seeds=vmap_seeds.QUICK_SEEDS, seeds_small_batch=replace(vmap_seeds.QUICK_SEEDS, batch=8))


def device_unavailable(device: str) -> Optional[str]:
    """None if the suite can run on ``device`` here, else why not."""
    if device not in DEVICES:
        return f"unknown device {device!r}; choose from {DEVICES}"
    if device == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else f"is built for CUDA {torch.version.cuda}"
        return (f"--device cuda needs a GPU, but torch.cuda.is_available() is False (torch {torch.__version__} "
                f"{build}); run on the CPU (the default) or on a machine with CUDA")
    return None


def _synchronizer(device: str) -> Callable[[], None]:
    """What makes a timed call complete: CUDA kernels run asynchronously to the Python that launches them."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@contextmanager
def _num_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def truncation_methods(K: int) -> List[str]:
    """The unroll variants of the truncation section at K: truncate T in {1, K/2, K}, checkpoint, both (T = K/2)."""
    half = max(1, K // 2)
    return ([unroll_method(truncate=T) for T in sorted({1, half, K})]
            + [unroll_method(checkpoint=True), unroll_method(truncate=half, checkpoint=True)])


def compare(grads: Sequence[Tensor], reference: Sequence[Tensor]) -> Dict[str, Any]:
    """Largest absolute difference, and the same divided by the largest absolute entry of ``reference``."""
    nan = any(bool(g.isnan().any()) for g in list(grads) + list(reference))
    max_abs = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
    scale = max(float(r.abs().max()) for r in reference)
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "nan": nan}


def _timed_call(fn: GradFn, sync: Callable[[], None]) -> Tuple[float, Tuple[Tensor, ...]]:
    """Seconds of one complete call of ``fn`` (``sync`` before and after), and its result."""
    gc.collect()
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def _time_round_robin(fns: Dict[str, GradFn], reps: int, warmup: int, sync: Callable[[], None] = lambda: None
                      ) -> Tuple[Dict[str, List[float]], Dict[str, Tuple[Tensor, ...]]]:
    """Seconds per call of each function over ``reps`` rounds, and each function's first result."""
    first = {}
    for i in range(warmup):
        for name, fn in fns.items():
            out = fn()
            if i == 0:
                first[name] = out
    names = list(fns)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        # Rotate who goes first so that no method always runs right after the same neighbour.
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed_call(fns[name], sync)[0])
    return times, first


def _checks(model: str, K: int, first: Dict[str, Tuple[Tensor, ...]], stop_grad: Optional[Tuple[Tensor, ...]],
            tolerance: float) -> List[Dict[str, Any]]:
    rows = []
    pairs = [(m, "unroll", first[m]) for m in ("higher", "torchopt") if m in first]
    if stop_grad is not None and "first_order" in first:
        # The first-order loop's gradient is the stop-gradient unrolled gradient (first term of Eq. 12).
        pairs.append(("first_order", "unroll stop_grad=True", first["first_order"]))
    for method, reference_name, grads in pairs:
        reference = stop_grad if reference_name != "unroll" else first["unroll"]
        result = compare(grads, reference)
        ok = None if result["nan"] else result["max_rel"] <= tolerance
        rows.append({"model": model, "K": K, "method": method, "reference": reference_name, **result, "ok": ok})
    return rows


def _machine(device: str) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("torch", "higher", "torchopt", "unroll"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if device == "cuda" else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "versions": versions}


def _loadavg() -> Optional[List[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_suite(config: Config, log: Log = lambda message: print(message, file=sys.stderr)) -> Dict[str, Any]:
    """Run the benchmark described by ``config`` and return its results (JSON-serialisable)."""
    reason = device_unavailable(config.device)
    if reason is not None:
        raise ValueError(reason)
    unknown = [s for s in config.sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {SECTIONS}")
    skipped = {m: reason for m in config.methods if (reason := unavailable(m)) is not None}
    methods = [m for m in config.methods if m not in skipped]
    if "comparison" in config.sections and "unroll" not in methods:
        raise ValueError("the suite measures everything relative to unroll; include it in the methods")
    results: Dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(config.device),
        "config": asdict(config), "models": {}, "skipped": skipped, "load_before": _loadavg(),
        "timings": [], "checks": [], "memory": [], "memory_skipped": None, "checkpoint": None, "truncation": None,
        "seeds": None, "seeds_small_batch": None, "seeds_skipped": None,
    }
    start = time.perf_counter()
    if "comparison" in config.sections:
        _comparison(config, methods, results, log)
        results["timing_seconds"] = time.perf_counter() - start
        results["load_after_timing"] = _loadavg()
        if config.memory:
            _memory(config, methods, results, log)
    if "checkpoint" in config.sections:
        _checkpoint(config, results, log)
    if "truncation" in config.sections:
        _truncation(config, results, log)
    if "seeds" in config.sections:
        _seeds(config, results, log)
    results["total_seconds"] = time.perf_counter() - start
    return results


def _comparison(config: Config, methods: List[str], results: Dict[str, Any], log: Log) -> None:
    """Timings of every method, model, K and thread count, and the correctness side-check."""
    sync = _synchronizer(config.device)
    # Set-up runs at the first thread count too: oversubscribed OpenMP threads spin and waste CPU.
    with _num_threads(config.threads[0]):
        for model in config.models:
            problem = make_problem(model, config.seed, config.device)
            _drop_failing(problem, methods, results["skipped"], config.device)
            results["models"][model] = problem.describe()
            log(f"[{model}] {problem.describe()}")
            for K in config.ks:
                fns = {m: make(m, problem, K) for m in methods}
                stop_grad = make_unroll(problem, K, stop_grad=True)() if "first_order" in fns else None
                for i, threads in enumerate(config.threads):
                    with _num_threads(threads):
                        times, first = _time_round_robin(fns, config.reps_for(model), config.warmup, sync)
                    if i == 0:
                        results["checks"] += _checks(model, K, first, stop_grad, config.tolerance)
                    for m, ts in times.items():
                        results["timings"].append({"model": model, "threads": threads, "K": K, "method": m,
                                                   "median_ms": 1e3 * statistics.median(ts),
                                                   "times_ms": [1e3 * t for t in ts]})
                    log(f"[{model}] K={K} threads={threads}: " + ", ".join(
                        f"{m} {1e3 * statistics.median(ts):.1f} ms" for m, ts in times.items()))


def _drop_failing(problem: Any, methods: List[str], skipped: Dict[str, str], device: str) -> None:
    """Skip, with the reason, an optional (third-party) method that fails on this problem, e.g. on CUDA."""
    for m in [m for m in methods if m in OPTIONAL]:
        try:
            make(m, problem, 1)()
        except Exception as error:  # whatever higher or torchopt raise: the page says what it was
            skipped[m] = f"failed on {device} ({problem.name}, K = 1): {type(error).__name__}: {error}"
            methods.remove(m)


def _memory(config: Config, methods: Sequence[str], results: Dict[str, Any], log: Log) -> None:
    reason = memory.supported(config.device)
    if reason is not None:
        results["memory_skipped"] = reason
        return
    for m in methods:
        log(f"peak memory of {m}" + (" (subprocess)" if config.device == "cpu" else ""))
        for model, per_k in memory.measure(config.models, m, config.ks, config.seed, config.device).items():
            for K, growth in per_k.items():
                results["memory"].append({"model": model, "K": K, "method": m, "peak_growth_mib": growth / 2 ** 20})


def _checkpoint(config: Config, results: Dict[str, Any], log: Log) -> None:
    """Memory target: at K = checkpoint_k on the conv model, checkpointed peak memory <= 1/5 of plain, same grad."""
    reason = unavailable(CHECKPOINT_METHOD) or (None if config.memory else "memory measurement disabled")
    reason = reason or memory.supported(config.device)
    if reason is None and "conv" not in config.models:
        reason = "the conv model is not in this run"
    if reason is not None:
        results["checkpoint"] = {"skipped": reason}
        return
    K = config.checkpoint_k
    log(f"[conv] checkpoint comparison at K={K}")
    sync = _synchronizer(config.device)
    with _num_threads(1):
        problem = make_problem("conv", config.seed, config.device)
        seconds, grads = {}, {}
        for m in ("unroll", CHECKPOINT_METHOD):
            seconds[m], grads[m] = _timed_call(make(m, problem, K), sync)
        diff = compare(grads[CHECKPOINT_METHOD], grads["unroll"])
        peaks = {m: memory.measure(["conv"], m, [K], config.seed, config.device)["conv"][K] / 2 ** 20
                 for m in ("unroll", CHECKPOINT_METHOD)}
    ratio = peaks[CHECKPOINT_METHOD] / peaks["unroll"]
    results["checkpoint"] = {"K": K, "plain_mib": peaks["unroll"], "checkpoint_mib": peaks[CHECKPOINT_METHOD],
                             "plain_s": seconds["unroll"], "checkpoint_s": seconds[CHECKPOINT_METHOD],
                             "ratio": ratio, **diff, "ok_memory": ratio <= CHECKPOINT_MEMORY_TARGET,
                             "ok_grad": not diff["nan"] and diff["max_rel"] <= config.checkpoint_tolerance}


def _truncation(config: Config, results: Dict[str, Any], log: Log) -> None:
    """What truncation saves: time, peak memory and gradient of truncated unrolls (truncate T of K steps), 1 thread.

    Every model and K of the section: the variants of :func:`truncation_methods` timed round-robin, each
    gradient compared with the full one (truncate=K), and the checks that truncate=K equals the plain unroll and
    that checkpointing changes no truncated gradient.
    """
    reason = unavailable(unroll_method(truncate=1, checkpoint=True))
    if reason is not None:
        results["truncation"] = {"skipped": reason}
        return
    sync = _synchronizer(config.device)
    rows: List[Dict[str, Any]] = []
    checks: List[Dict[str, Any]] = []
    with _num_threads(1):
        for model in config.models:
            problem = make_problem(model, config.seed, config.device)
            for K in config.truncation_ks:
                names = truncation_methods(K)
                full, half = unroll_method(truncate=K), max(1, K // 2)
                times, first = _time_round_robin({m: make(m, problem, K) for m in names},
                                                 dict(config.truncation_reps)[model], config.warmup, sync)
                first["unroll"] = make("unroll", problem, K)()
                for m in names:
                    rows.append({"model": model, "K": K, "method": m, "options": describe(m),
                                 "median_ms": 1e3 * statistics.median(times[m]),
                                 "times_ms": [1e3 * t for t in times[m]],
                                 "vs_full": compare(first[m], first[full])})
                pairs = ((full, "unroll"), (CHECKPOINT_METHOD, full),
                         (unroll_method(truncate=half, checkpoint=True), unroll_method(truncate=half)))
                for method, reference in pairs:
                    diff = compare(first[method], first[reference])
                    checks.append({"model": model, "K": K, "method": method, "reference": reference, **diff,
                                   "ok": not diff["nan"] and diff["max_rel"] <= config.checkpoint_tolerance})
                log(f"[{model}] truncation K={K}: " + ", ".join(
                    f"{describe(m)} {1e3 * statistics.median(times[m]):.1f} ms" for m in names))
    results["truncation"] = {"rows": rows, "checks": checks, "memory_skipped": None}
    reason = None if config.memory else "memory measurement disabled"
    reason = reason or memory.supported(config.device)
    if reason is not None:
        results["truncation"]["memory_skipped"] = reason
        return
    for K in config.truncation_ks:
        for m in truncation_methods(K):
            log(f"peak memory of {m} at K={K}")
            peaks = memory.measure(config.models, m, [K], config.seed, config.device)
            for row in rows:
                if (row["K"], row["method"]) == (K, m):
                    row["peak_growth_mib"] = peaks[row["model"]][K] / 2 ** 20


def _seeds(config: Config, results: Dict[str, Any], log: Log) -> None:
    if config.device != "cpu":
        results["seeds_skipped"] = SEEDS_ON_CUDA
        return
    if config.seeds is None:
        return
    log("[mixture] N seeds with vmap vs separate runs")
    results["seeds"] = vmap_seeds.measure(config.seeds, log)
    if config.seeds_small_batch is not None:
        log(f"[mixture] N seeds with vmap vs separate runs, batch {config.seeds_small_batch.batch}")
        results["seeds_small_batch"] = vmap_seeds.measure(config.seeds_small_batch, log)


# ----------------------------------------------------------------------------------------------------------
# The markdown page


def _median(results: Dict[str, Any], model: str, threads: int, K: int, method: str) -> Optional[float]:
    for row in results["timings"]:
        if (row["model"], row["threads"], row["K"], row["method"]) == (model, threads, K, method):
            return row["median_ms"]
    return None


def _met(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def _target_rows(results: Dict[str, Any]) -> List[List[str]]:
    config = results["config"]
    sections = config.get("sections", SECTIONS)
    rows = []
    for model in config["models"]:
        for threads in config["threads"]:
            for K in config["ks"]:
                unroll_ms = _median(results, model, threads, K, "unroll")
                others = [t for m in ("higher", "torchopt") if (t := _median(results, model, threads, K, m))]
                if K >= 5 and others:
                    ratio = unroll_ms / min(others)
                    rows.append([f"unroll ≤ {SPEED_TARGET}× faster of higher/torchopt", model, str(threads),
                                 str(K), f"{ratio:.2f}×", _met(ratio <= SPEED_TARGET)])
                first_order = _median(results, model, threads, K, "first_order")
                if K == FIRST_ORDER_TARGET_K and first_order:
                    ratio = unroll_ms / first_order
                    rows.append([f"unroll ≤ {FIRST_ORDER_TARGET}× first-order", model, str(threads), str(K),
                                 f"{ratio:.2f}×", _met(ratio <= FIRST_ORDER_TARGET)])
    if "checkpoint" in sections:
        rows += _checkpoint_target_rows(results)
    if "seeds" in sections:
        rows += _seeds_target_rows(results)
    return rows


def _checkpoint_target_rows(results: Dict[str, Any]) -> List[List[str]]:
    checkpoint = results["checkpoint"] or {"skipped": "not run"}
    if "skipped" in checkpoint:
        return [["checkpointed unroll peak ≤ 1/5 of plain, same gradient to 1e-6", "conv", "1",
                 str(results["config"]["checkpoint_k"]), f"not measured: {checkpoint['skipped']}", "n/a"]]
    return [["checkpointed unroll peak ≤ 1/5 of plain", "conv", "1", str(checkpoint["K"]),
             f"{checkpoint['ratio']:.3f}×", _met(checkpoint["ok_memory"])],
            ["checkpointed gradient = plain to 1e-6 (relative)", "conv", "1", str(checkpoint["K"]),
             f"{checkpoint['max_rel']:.1e}", _met(checkpoint["ok_grad"])]]


def _seeds_target_rows(results: Dict[str, Any]) -> List[List[str]]:
    seeds = results.get("seeds")
    if seeds is None:
        n = vmap_seeds.TARGET_SEEDS
        where = f"on {results['config'].get('device')} (CPU only)" if results.get("seeds_skipped") else "in this run"
        return [[f"N = {n} mixture seeds in one process (vmap) ≤ {vmap_seeds.TARGET}× {n} separate runs", "mixture",
                 "1", "5", f"not measured {where}", "n/a"]]
    c = seeds["config"]
    return [[f"N = {c['seeds']} mixture seeds in one process (vmap) ≤ {vmap_seeds.TARGET}× {c['seeds']} separate runs",
             "mixture", str(c["threads"]), str(c["K"]), f"{seeds['ratio']:.2f}×", _met(seeds["ok"])]]


def _seeds_section(measurements: Sequence[Dict[str, Any]]) -> List[str]:
    c = measurements[0]["config"]
    out = [
        "", "## N seeds in one process (`torch.func.vmap`) vs N separate runs, mixture", "",
        f"{c['seeds']} seeds × {c['iterations']} training iterations of `examples/unroll_examples/training.py` "
        f"(K = {c['K']}), {c['threads']} thread, median of {c['reps']} interleaved repetitions "
        "(`benchmarks/vmap_seeds.py`). "
        "The target is at App. A's batch of 512; the smaller batch shows where vmap pays.", "",
    ]
    rows = []
    for seeds in measurements:
        m, diff, batch = seeds["median_s"], seeds["max_abs_diff"], str(seeds["config"]["batch"])
        rows += [
            [batch, "vmap: one `Trainer(cfg, seeds)`", f"{m['vmap']:.2f}", f"{seeds['ratio']:.2f}×", "–"],
            [batch, "separate: `make_iteration(cfg)` per seed, no vmap", f"{m['separate']:.2f}", "1.00×",
             f"{diff['separate']:.1e}"],
            [batch, "separate `Trainer(cfg, [seed])` (vmaps a seed next to its copy: 2× the arithmetic)",
             f"{m['separate_trainer']:.2f}", f"{m['separate_trainer'] / m['separate']:.2f}×",
             f"{diff['separate_trainer']:.1e}"],
        ]
    return out + [report.table(rows, ["batch", "way", "median s", "÷ separate", "max abs diff of G params vs vmap"])]


def _timing_table(results: Dict[str, Any], model: str, methods: Sequence[str]) -> List[str]:
    header = (["threads", "K"] + [f"{m} ms" + ("" if m == "unroll" else " (÷ unroll)") for m in methods]
              + ["unroll ÷ faster of higher/torchopt", "unroll ÷ first-order"])
    rows = []
    config = results["config"]
    for threads in config["threads"]:
        for K in config["ks"]:
            unroll_ms = _median(results, model, threads, K, "unroll")
            cells = []
            for m in methods:
                t = _median(results, model, threads, K, m)
                if t is None:
                    cells.append("–")
                else:
                    cells.append(f"{t:.1f}" if m == "unroll" else f"{t:.1f} ({t / unroll_ms:.2f}×)")
            others = [t for m in ("higher", "torchopt") if (t := _median(results, model, threads, K, m))]
            first_order = _median(results, model, threads, K, "first_order")
            cells.append(f"{unroll_ms / min(others):.2f}×" if others else "–")
            cells.append(f"{unroll_ms / first_order:.2f}×" if first_order else "–")
            rows.append([str(threads), str(K)] + cells)
    return [report.table(rows, header)]


def _memory_table(results: Dict[str, Any], model: str, methods: Sequence[str]) -> List[str]:
    peak = {(r["K"], r["method"]): r["peak_growth_mib"] for r in results["memory"] if r["model"] == model}
    rows = [[str(K)] + [f"{peak[(K, m)]:.1f}" if (K, m) in peak else "–" for m in methods]
            for K in results["config"]["ks"]]
    return [report.table(rows, ["K"] + [f"{m} MiB" for m in methods])]


def _check_lines(checks: Sequence[Dict[str, Any]], tolerance: float, label: Callable[[str], str] = str
                 ) -> List[str]:
    """A table of gradient comparisons (rows of :func:`compare` with model, K, method, reference and ok)."""
    rows = [[r["model"], str(r["K"]), label(r["method"]), label(r["reference"]), f"{r['max_abs']:.2e}",
             f"{r['max_rel']:.2e}", "NaN (excluded)" if r["ok"] is None else ("yes" if r["ok"] else "**no**")]
            for r in checks]
    return [report.table(rows, ["model", "K", "method", "compared with", "max abs diff", "max rel diff",
                                f"agrees to {tolerance:g}"])]


METHOD_NOTES = f"""\
## What is measured

One generator gradient d f_K / d θ_G of the unrolled surrogate (Eq. 9–12 of Metz et al., 2017): K steps of the
discriminator's Adam (betas (0.5, 0.999), eps 1e-8) on a fixed minibatch, then the zero-sum generator loss
f = −L_D (App. A) at θ_D^K, differentiated with respect to θ_G through all K steps. Each timed call does what a
training step repeats: the generator's forward pass, a copy of the discriminator optimizer's current state,
the unroll, and `torch.autograd.grad` to the generator's parameters.

Models (`benchmarks/models.py`, built from seed 0):
- **mixture** (App. A, the networks and ring data of the experiments, `examples/unroll_examples/models.py` and
  `data.py`): G 256 → 128 → 128 → 2 (ReLU), D x/4 → 128 ReLU → 1 logit, both with orthogonal init × 0.8,
  batch {MIXTURE_BATCH}, 8-Gaussian ring data, D learning rate 1e-4.
- **conv** (App. D/E sizes on 28×28×1 images): D = App. D's discriminator at width X = 1/4 (App. F's
  scaling): Conv {'/'.join(map(str, CONV_D_CHANNELS))} (3×3, stride 2, BatchNorm, leaky ReLU 0.3) → FC 1;
  G = App. E's generator: FC 4·4·{CONV_G_CHANNELS[0]} → TConv {'/'.join(map(str, CONV_G_CHANNELS[1:]))}
  (3×3, stride 2, 4 → 7 → 14 → 28, BatchNorm, ReLU) → Conv 1 → tanh; batch {CONV_BATCH}; D learning rate 2e-4
  (App. D). BatchNorm uses batch statistics (no running buffers); convolutions followed by BatchNorm have no
  bias. Images are synthetic (uniform in [−1, 1]): the cost does not depend on pixel values.
- The discriminator's Adam starts from a late-training state (step {STEADY_STEP:,}, moments = mean gradient and
  mean squared gradient over 8 minibatches), not from zeros. From the zero state the first update is
  lr·g/(|g| + eps), whose derivative ≈ lr/eps where |g| ≪ eps: the few entries whose gradient happens to be
  ≈ 1e-8 dominate the meta-gradient, and implementations agree only on rounding noise (we saw relative
  differences of up to 90 % on the conv model). At step 10 000 higher's Adam, which adds eps before the
  sqrt(1 − β2^t) bias correction, also coincides with torch.optim's.

Methods (`benchmarks/methods.py`):
- **unroll**: `unroll.surrogate_loss(d_loss, K, optimizer=opt)` with `opt, state = unroll.from_torch(d_adam, D)`.
  Outside `torch.func` transforms, as here, it takes each inner gradient with `torch.autograd.grad`
  (`create_graph=True`); under `torch.func.grad`/`vmap` with `torch.func.grad`. The optimizer math runs once per
  step on D's parameters packed into one vector.
- **higher**: `higher.innerloop_ctx(D, d_adam, copy_initial_weights=False, track_higher_grads=True)`,
  `diffopt.step(loss)` K times.
- **torchopt**: `torchopt.MetaAdam(D, eps_root={TORCHOPT_EPS_ROOT:g})` with the torch.optim moments and step
  count loaded into its `ScaleByAdamState`, K `step(loss)` calls, `recover_state_dict` afterwards. With
  eps_root = 0 its mixture gradient is NaN (infinite derivative of sqrt at the exactly-zero second moment of a
  dead ReLU unit); eps_root = 1e-8 removes the NaN but moves the gradient by 2e-5 (mixture) and 1.2e-5 (conv)
  relative at K = 5, beyond the 1e-5 check; {TORCHOPT_EPS_ROOT:g} removes the NaN and changes nothing
  measurable. Its C++ accelerated ops do not load with torch 2.13 (undefined symbol in `torchopt/_C`), so
  the default pure-PyTorch path (`use_accelerated_op=False`) is measured. higher 0.2.1 (2020) works as is.
- **first_order**: the floor. K `torch.optim.Adam` steps on a copy of D (`loss.backward()`, no graph kept)
  plus one generator gradient through θ_D^K: K + 1 plain discriminator gradient evaluations. Its gradient is
  that of `surrogate_loss(..., stop_grad=True)`, which the correctness check uses.

Timing: all methods in one process, interleaved round-robin within each repetition (the first method
rotates), after one untimed warm-up call each; medians over the repetitions; `torch.set_num_threads(1)` and
`(2)`; `gc.collect()` before every timed call.

Peak memory (`benchmarks/memory.py`): in a fresh subprocess per model and method (1 thread), after a K = 1
warm-up, the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), and the page reports the peak RSS
(VmHWM) during one gradient computation minus the RSS just before it: the memory the computation adds on
top of models, data and optimizer state. The subprocess sets `MALLOC_MMAP_THRESHOLD_=65536` so that glibc
returns freed blocks ≥ 64 KiB to the kernel at once (otherwise memory freed after the warm-up is reused
unseen). tracemalloc cannot see torch's CPU tensors, and torch keeps no CPU allocator statistics.

Memory-bounded unroll (issue 6): on the conv model at K = 100 (K = 4 with `--quick`), the peak RSS growth
of `surrogate_loss(..., checkpoint=True)` against the plain unroll (one subprocess each, as above), one timed
call of each at 1 thread, and their gradients (must agree to 1e-6 relative).

Truncated unrolls (issue 13): at K = {' and '.join(map(str, Config.truncation_ks))} \
({' and '.join(map(str, QUICK.truncation_ks))} with `--quick`) on every model, `truncate` T ∈ {{1, K/2,
K}}, `checkpoint=True`, and `checkpoint=True` with T = K/2, timed round-robin at 1 thread (as above, with fewer
repetitions on the conv model, where one round at K = 100 takes about 15 s on a quiet CPU; the section says how
many), peak memory as above (one subprocess per variant and K; a variant is warmed up at K = 2 with T = 1, which
runs the same code: a constant step and a differentiated one). Checks, to 1e-6 relative: truncate = K against
the plain unroll, `checkpoint=True` against truncate = K, and checkpoint + truncate = K/2 against truncate = K/2.

Correctness: for each model and K, the first (warm-up) results of higher and torchopt are compared with
unroll's, and first_order's with unroll's `stop_grad=True` gradient: max |a − b| over all generator
parameters, absolute and divided by the largest |entry| of the reference ("max rel diff"; must be
≤ 1e-5). NaN results would be reported and excluded.

N seeds in one process (`benchmarks/vmap_seeds.py`): the mixture experiment's training loop
(`examples/unroll_examples/training.py`: one D Adam step, then one G step on the unrolled surrogate; batch 512)
for N seeds,
timed over the training iterations only (drawing the batches included, evaluation excluded): one `Trainer` with
all N seeds stacked and `torch.func.vmap`-ed, against the N seeds run one after the other with the same pure
iteration without vmap (the target's baseline), and against N one-seed `Trainer`s (which vmap each seed next
to a copy of itself, twice the arithmetic: shown, not used for the target). Interleaved, fresh trainers per
repetition, one untimed warm-up iteration, medians; the final generator parameters are compared.

"""


WHY_SPEED = """\
**unroll ≤ 0.7× the faster of higher and torchopt.** The three compute the same exact gradient with the same
heavy kernels: per unrolled step a forward and a `create_graph` backward pass of D, then one reverse pass over
all of it (a double backward), which costs about 2–3.5× the first-order loop on these models. A one-off
torch.profiler session (K = 10, 1 thread, 2026-11-24; not part of this command, so its counts are fixed text)
counts identical calls of every heavy kernel in all three (mixture: 241 `mm`, 47 `addmm`,
62 `threshold_backward` per gradient; conv: 200 convolutions, 127 `convolution_backward`, 127
`native_batch_norm_backward`), and these kernels alone take about half (mixture) to two thirds (conv) of each
method's time. unroll issues about 30 % fewer ATen operations in all (mixture 6,915 against 9,844 per gradient;
conv 25,943 against 36,423), by running the optimizer math once per step on one packed vector and by taking
the inner gradients with plain autograd (`torch.func.grad`'s per-operation wrapping cost 6–16 % of the time on
the mixture, 3–4 % on the conv model). Most of what remains besides the heavy kernels is D's own light
operations (bias adds, transposes, activations, the loss) and their derivatives, which every exact method runs
too. Fusing Adam's update (`addcmul`, fewer kernels in the zero-safe square root) changed the time by less
than 1 %, and per-tensor instead of packed updates made it 17 % (mixture) and 4 % (conv) slower. So unroll
sits at the floor that higher and torchopt share, somewhat below them: 0.7× would need doing less arithmetic
than an exact unrolled gradient needs. `torch.compile` is no way out either: its compiled graphs do not
support double backward (the gradient of a `create_graph` gradient through a compiled region fails with
torch 2.13).
"""

WHY_SEEDS = """\
**N = 10 vmapped seeds ≤ 0.5× 10 separate runs.** `vmap` saves per-operation overhead (one batched kernel
instead of N small ones), not arithmetic. At batch 512 and 1 thread an iteration of the mixture GAN is
dominated by the kernels themselves (G's matrix products, D's elementwise work on 1,024 × 128 activations per
seed), so vmap took {ratio:.2f}× the separate runs' time here ({spread} in single repetitions; the ratio moves
between runs). {small}Against N one-seed `Trainer`s vmap looks {trainer:.1f}× as fast, but only because those
compute every seed twice.
"""


def _why_seeds(results: Dict[str, Any]) -> str:
    if not results.get("seeds"):
        return ""
    small = results.get("seeds_small_batch")
    small_text = (f"Where overhead does dominate, vmap pays:\nat batch {small['config']['batch']} the same "
                  f"{small['config']['seeds']} seeds took {small['ratio']:.2f}× the separate runs' time. "
                  if small else "")
    times = results["seeds"]["times_s"]
    ratios = [v / s for v, s in zip(times["vmap"], times["separate"])]
    spread = f"{min(ratios):.2f}–{max(ratios):.2f}×"
    return WHY_SEEDS.format(ratio=results["seeds"]["ratio"], spread=spread, small=small_text,
                            trainer=1 / results["seeds"]["ratio_trainer"])


WHY_FIRST_ORDER = """\
**unroll ≤ 3.2× first-order.** The floor of about 3× counts the reverse pass over a step's forward and
backward as costing as much as both; on the conv discriminator it costs more. BatchNorm's double backward
(`NativeBatchNormBackwardBackward0`) alone takes about a fifth of unroll's time at K = 10, and each
convolution's backward is reversed with two more convolutions. higher and torchopt are as far from the
first-order loop (compare their times with first_order's in the table below). The unroll also keeps every
step's activations (about ten times the first-order loop's memory at K = 10, the memory table), which costs
cache and memory bandwidth. The conv ratio moves with the machine's load (2.9× in one run on a loaded machine),
but on a quiet machine it stays above 3.2×: the conv model misses this target, the mixture model meets it.
"""


def _peak_label(device: str) -> str:
    return "peak CUDA memory growth" if device == "cuda" else "peak RSS growth"


def render_markdown(results: Dict[str, Any], command: str, figure: Optional[str] = None) -> str:
    """The benchmarks page: command, run details, its figure (``figure``: the PNG's path relative to the page, see
    :mod:`benchmarks.plots`), targets, timings, memory, correctness, method notes."""
    config, machine = results["config"], results["machine"]
    sections, device = config.get("sections", SECTIONS), config.get("device", "cpu")
    methods = [m for m in config["methods"] if m not in results["skipped"]]
    load, load_after = results.get("load_before"), results.get("load_after_timing")
    peak = _peak_label(device)
    out = [
        "# Benchmarks: one unrolled generator gradient",
        "",
        *report.made_by(command, "Regenerate this page (numbers, tables and notes) with:"),
        "",
        f"Run on {results['date']} in {results['total_seconds']:.0f} s: {machine['cpu']}, {machine['cpus']} "
        f"CPUs, " + (f"GPU {machine['gpu']}, " if machine.get("gpu") else "") + f"Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + "."
        + (f" Load average before the run: {load[0]:.2f}" if load else "")
        + (f"; after the timings: {load_after[0]:.2f}." if load and load_after else "." if load else ""),
        "",
    ]
    if figure:
        out += [f"![{plots.ALT_TEXT}]({figure})", ""]
    if device != "cpu":
        out += [f"**Device: {device}.** Models, data and optimizer state live on the GPU; see "
                "[On CUDA](#on-cuda) below.", ""]
    if results.get("note"):
        out += [f"**Note:** {results['note']}", ""]
    for method, reason in results["skipped"].items():
        out += [f"**{method} skipped:** {reason}", ""]
    rows = _target_rows(results)
    if rows:
        out += ["## Targets of issue 6", "",
                "Ratios are unroll's median time divided by the other method's (smaller is better for unroll).", "",
                report.table(rows, ["target", "model", "threads", "K", "measured", "verdict"])]
    why = [text for text, target in ((WHY_SPEED, "faster of higher/torchopt"), (WHY_FIRST_ORDER, "first-order"),
                                     (_why_seeds(results), "seeds in one process"))
           if any(target in row[0] and "not met" in row[-1] for row in rows)]
    if why:
        out += ["", "### Why the targets marked not met are not met", ""] + why
    if "comparison" in sections:
        for model in config["models"]:
            out += ["", f"## {model}: median time per gradient", "", f"{results['models'][model]}.", ""]
            out += _timing_table(results, model, methods)
            if results["memory"]:
                out += ["", f"{peak.capitalize()} during one gradient ({model}, 1 thread):", ""]
                out += _memory_table(results, model, methods)
        if results["memory_skipped"]:
            out += ["", f"Peak memory not measured: {results['memory_skipped']}."]
    checkpoint = results["checkpoint"] or {"skipped": "not run"}
    if "skipped" not in checkpoint:
        out += ["", f"## Memory-bounded unroll (`surrogate_loss(..., checkpoint=True)`), conv, K = {checkpoint['K']}",
                "", f"One call each, 1 thread; {peak} as above.", "",
                # Written out: its empty corner cell is "| |" on the committed pages, report.table writes "|  |".
                f"| | {peak} MiB | time s |", "|---|---|---|",
                f"| plain unroll | {checkpoint['plain_mib']:.1f} | {checkpoint['plain_s']:.2f} |",
                f"| checkpoint=True | {checkpoint['checkpoint_mib']:.1f} | {checkpoint['checkpoint_s']:.2f} |",
                "", f"Gradient difference: max abs {checkpoint['max_abs']:.2e}, max rel {checkpoint['max_rel']:.2e}."]
    if results.get("truncation"):
        out += _truncation_section(results)
    if results.get("seeds"):
        out += _seeds_section([r for r in (results["seeds"], results.get("seeds_small_batch")) if r])
    elif results.get("seeds_skipped"):
        out += ["", "## N seeds in one process (`torch.func.vmap`) vs N separate runs, mixture", "",
                f"Not measured on {device}: {results['seeds_skipped']}."]
    if "comparison" in sections:
        out += ["", "## Correctness side-check", ""] + _check_lines(results["checks"], config["tolerance"])
    out += ["", METHOD_NOTES]
    if device == "cuda":
        out += [CUDA_NOTES]
    return "\n".join(out)


TRUNCATION_TEXT = """\
`surrogate_loss(..., truncate=T)` differentiates only the last T of the K unrolled steps: θ_D^(K−T) enters them
as a constant, so the backward pass and what it keeps grow with T instead of K, and the gradient is truncated (the
last column: how far it is from the full gradient, truncate = K). `checkpoint=True` recomputes each
differentiated step during the backward pass instead of keeping it; it combines with `truncate`. One
generator gradient, 1 thread, median of {reps} repetitions interleaved round-robin in one process after
{warmup} untimed call(s) each; {peak} during one gradient (see "What is measured"), one {where} per variant
and K; "÷ full" divides by the truncate = K row."""


def _truncation_section(results: Dict[str, Any]) -> List[str]:
    """The truncation section: truncated unrolls side by side, per model and K, and their gradient checks."""
    truncation, config = results["truncation"], results["config"]
    device = config.get("device", "cpu")
    title = "## Truncated unrolls (`surrogate_loss(..., truncate=T)`)"
    if "skipped" in truncation:
        return ["", title, "", f"Not measured: {truncation['skipped']}."]
    peak = _peak_label(device)
    reps = ", ".join(f"{n} ({model})" for model, n in config["truncation_reps"] if model in config["models"])
    where = "subprocess" if device == "cpu" else "in-process measurement"
    out = ["", title, "", TRUNCATION_TEXT.format(reps=reps, warmup=config["warmup"], peak=peak, where=where)]
    if truncation["memory_skipped"]:
        out += ["", f"Peak memory not measured: {truncation['memory_skipped']}."]
    for model in config["models"]:
        rows = [r for r in truncation["rows"] if r["model"] == model]
        cells = []
        for row in rows:
            full = next(r for r in rows if (r["K"], r["method"]) == (row["K"], unroll_method(truncate=row["K"])))
            mib = row.get("peak_growth_mib")
            memory_cells = [f"{mib:.1f}", f"{mib / full['peak_growth_mib']:.2f}×"] if mib is not None else ["–", "–"]
            label = row["options"] + (" (full gradient)" if row is full else "")
            time_cells = [f"{row['median_ms']:.1f}", f"{row['median_ms'] / full['median_ms']:.2f}×"]
            cells.append([str(row["K"]), label, *time_cells, *memory_cells, f"{row['vs_full']['max_rel']:.2e}"])
        out += ["", f"### {model}", "", report.table(cells, ["K", "options", "median ms", "÷ full", f"{peak} MiB",
                                                            "÷ full", "max rel diff from the full gradient"])]
    out += ["", "Checks: truncate = K is the full gradient of the plain unroll, and checkpointing changes no "
            "gradient.", ""] + _check_lines(truncation["checks"], config["checkpoint_tolerance"], describe)
    return out


CUDA_NOTES = """\
## On CUDA

`--device cuda`: models, data and the discriminator's Adam state are built on the CPU from the same seed and
moved to the GPU (`benchmarks/models.py`, `to_device`; torch.optim keeps Adam's step count on the CPU, as it
does for any non-fused Adam). Every timed call is bracketed by `torch.cuda.synchronize()`. Peak memory is
measured in-process: after the same warm-up, `torch.cuda.reset_peak_memory_stats()`, then
`max_memory_allocated()` during one gradient minus `memory_allocated()` just before it (what the call adds on
top of models, data and state; the caching allocator's reserve is not counted). One CPU thread count: on the
GPU the CPU threads only launch kernels, so the thread sweep says nothing. higher and torchopt run on the GPU
when installed; one that fails there is skipped with its error on the page. The N-seeds comparison is not run:
""" + SEEDS_ON_CUDA + ".\n"


def _parse(argv: Optional[Sequence[str]]) -> Tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unrolled_gradient", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: K in (1, 2), 1 thread, 2-3 repetitions")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where models, data and optimizer state live (cuda: one thread count, in-process "
                             "peak memory, no vmap-seeds comparison)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown page here (default: print it)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON")
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--ks", nargs="+", type=int)
    parser.add_argument("--threads", nargs="+", type=int)
    parser.add_argument("--reps", type=int, help="timed repetitions for every model (method comparison)")
    parser.add_argument("--truncation-ks", nargs="+", type=int, help="K of the truncated unrolls (default 20 100)")
    parser.add_argument("--truncation-reps", type=int,
                        help="timed repetitions of the truncated unrolls for every model (default 10 mixture, 3 conv)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-vmap-seeds", action="store_true", help="skip N seeds vmapped vs separate runs")
    parser.add_argument("--note", help="a line printed at the top of the page (e.g. 'shared machine')")
    parser.add_argument("--plot-only", action="store_true",
                        help="measure nothing: draw the figure of the --out page (beside it, .png) from the numbers "
                             "in --json when given, else from the page's own tables; the page is not rewritten")
    args = parser.parse_args(argv)
    if args.plot_only and args.out is None:
        parser.error("--plot-only needs --out PAGE: the figure is drawn beside that page")
    reason = device_unavailable(args.device)
    if reason is not None:
        parser.error(reason)
    if args.device == "cuda" and args.threads and len(args.threads) > 1:
        parser.error("--threads: give one thread count with --device cuda (CPU threads only launch its kernels)")
    for name in ("truncation_ks", "threads"):
        if any(n < 1 for n in getattr(args, name) or ()):
            parser.error(f"--{name.replace('_', '-')} must be positive integers, got {getattr(args, name)}")
    for name in ("reps", "truncation_reps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    config = QUICK if args.quick else Config()
    overrides: Dict[str, Any] = {"device": args.device}
    if args.device == "cuda":
        overrides["threads"] = (1,)
    for name in ("models", "methods", "ks", "threads", "truncation_ks"):
        if getattr(args, name):
            overrides[name] = tuple(getattr(args, name))
    if args.only:
        overrides["sections"] = tuple(s for s in SECTIONS if s in args.only)
    if args.reps:
        overrides["reps"] = tuple((m, args.reps) for m in MODELS)
    if args.truncation_reps:
        overrides["truncation_reps"] = tuple((m, args.truncation_reps) for m in MODELS)
    if args.no_memory:
        overrides["memory"] = False
    if args.no_vmap_seeds:
        overrides["seeds"] = None
    return replace(config, **overrides), args


def figure_path(page: Path) -> Path:
    """Where the figure of the page ``page`` lives: beside it, same name, ``.png``."""
    return page.with_suffix(".png")


def plot_only(page: Path, results_json: Optional[Path] = None) -> Path:
    """Draw the figure of ``page`` from stored numbers, measuring nothing: the results in ``results_json`` (a
    ``--json`` file) when given, else the page's own tables. Returns the PNG's path.

    Raises :class:`benchmarks.plots.MalformedNumbers` (one line) when the numbers cannot be read.
    """
    figure = figure_path(page)
    plots.write_figure(plots.load_numbers(results_json or page), figure)
    return figure


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    config, args = _parse(argv)
    if args.plot_only:
        try:
            print(plot_only(args.out, args.json))
        except plots.MalformedNumbers as error:
            raise SystemExit(f"error: {error}") from None
        return {}
    results = run_suite(config)
    results["note"] = args.note
    # The note describes this run only; the command on the page is for rerunning elsewhere.
    command = report.command_line("-m benchmarks.unrolled_gradient", argv, drop_with_value=("--note",))
    figure = None
    numbers = plots.numbers_from_results(results)
    if args.out and numbers.rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plots.write_figure(numbers, figure_path(args.out))
        figure = figure_path(args.out).name
    page = render_markdown(results, command, figure)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page + "\n")
    else:
        print(page)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
