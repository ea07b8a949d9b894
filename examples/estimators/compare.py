"""Which meta-gradient should I use? Eleven estimators of d outer(theta_K(phi)) / d phi, side by side, on the
problems of ``problems.py`` (a weight decay and learning rate at two points, dataset distillation, a GAN): bias
against the exact gradient, spread over seeds, time and peak memory per gradient, and the outcome of an outer
optimisation driven by each. Results page: docs/results/estimators.md; README.md says what is measured and how.

    python examples/estimators/compare.py --threads 1                       # the default run (~10 min, one core)
    python examples/estimators/compare.py --threads 1 --resume              # continue it: finished cells are kept
    python examples/estimators/compare.py --problems gan --estimators exact,implicit_cg --seeds 3 --no-memory \\
        --outer-problems "" --out runs/estimators_gan                       # one corner of it
    bash examples/estimators/gpu.sh                                         # on a CUDA machine (--device cuda)
    python examples/estimators/compare.py --threads 1 --doc docs/results/estimators.md   # and write the page
    python examples/estimators/compare.py --report-only                     # remake the page, measuring nothing

Every number is stored in its own JSON file ("cell") under ``--out`` (default runs/estimators): gradients per
(problem, estimator), the timings of one problem's estimators (timed round-robin in one process), the peak memory
of one problem's estimators (measured in a fresh subprocess), and outer-optimisation runs per (problem, estimator)
and their controls. A cell's file name carries a hash of everything its numbers depend on, so ``--resume`` reads
back a finished cell (checked against its schema and key) instead of recomputing it, and never writes over a
file. The summary (``results.json``, ``table.md``, ``figure.png``) is remade from the cells at the end of a run.
With ``--doc PAGE`` the run then copies ``results.json`` and ``figure.png`` into PAGE's folder (PAGE less ``.md``)
and writes PAGE from that copy: its tables from the numbers, its prose from the page's hand-written blocks
(``<!-- notes:NAME -->`` ... ``<!-- /notes:NAME -->``, kept). ``--report-only`` remakes PAGE (default
docs/results/estimators.md) from that copy alone; a damaged results.json is refused, in one line, before anything
is written.

``--device cuda`` builds every problem exactly as on the CPU and moves it to the GPU; ES and PES then draw their
noise from a CUDA generator (same seeds, other numbers), times are read after ``torch.cuda.synchronize``, and peak
memory is the CUDA allocator's, measured in this process. Cells made on another device than the CPU carry the
device in their key; CPU cells keep the names they had before the flag existed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import problems
import torch
from problems import Params, Problem, fresh
from torch import Tensor

import unroll
from unroll_examples import memory as memory_probe
from unroll_examples import report, runs
from unroll_examples.cli import HelpFormatter, add_threads_flag
from unroll_examples.plotting import pyplot, save_figure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# ------------------------------------------------------------------------------------------------ configuration


def option(default: Any, help: str) -> Any:
    """A Config field with its --flag's help."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    problems: str = option("hyperparameter,hyperparameter_converged,distillation,gan", "problems to measure")
    estimators: str = option("exact,checkpoint,truncated,implicit_cg,implicit_neumann,implicit_fixed_point,es,"
                             "exact_average,tbptt,pes,tes", "estimators to measure (the exact references are added)")
    seeds: int = option(10, "estimates per stochastic estimator (seeds 0..seeds-1)")
    deterministic_seeds: int = option(2, "estimates per deterministic estimator (their spread must come out 0)")
    timing_reps: int = option(5, "timed gradients per estimator (median), round-robin over a problem's estimators")
    memory: bool = option(True, "peak RSS growth of one gradient (benchmarks/memory.py, one subprocess per problem); "
                                "on CUDA the allocator's peak, in this process")
    device: str = option("cpu", "torch device: cpu or cuda[:N] (every problem is built on the CPU, then moved)")
    checkpoint: int = option(4, "surrogate_loss(checkpoint=N): the most stored states")
    implicit_iterations: int = option(100, "the most cg / neumann / fixed_point iterations")
    implicit_tol: float = option(1e-10, "relative residual at which the implicit solvers stop")
    es_sigma: float = option(0.01, "ES / PES perturbation scale")
    es_particles: int = option(32, "ES evaluations per gradient (antithetic pairs: half as many directions)")
    pes_particles: int = option(32, "PES / truncated-ES particles")
    outer_problems: str = option("hyperparameter", "problems whose outer optimisation is run ('' for none)")
    outer_estimators: str = option("exact,truncated,implicit_cg,implicit_neumann,es,exact_average,tbptt,pes,tes",
                                   "estimators that drive an outer optimisation")
    outer_steps: int = option(20, "Adam steps on phi")
    outer_seeds: int = option(5, "outer runs per estimator, each on its own data draw (problem seed)")
    outer_lr: float = option(0.2, "Adam's rate on phi")


SCHEMA = "unroll-estimators-cell/1"
MiB = 2 ** 20
SMALL_PHI = 4        # phi with at most this many numbers: its gradients are printed and kept in results.json
DIVERGED = 10.0      # an outer run whose final validation loss exceeds its first by this factor diverged

# ------------------------------------------------------------------------------------------------ the estimators


class Estimate(NamedTuple):
    grads: Params
    diagnostics: Dict[str, float]


Strategy = Callable[[Config, Problem, Params, int], Estimate]
"""``estimate(cfg, problem, phi, seed) -> Estimate``: one gradient estimate at phi, deterministic in ``seed``."""


def unrolled_gradient(problem: Problem, phi: Params, **options: Any) -> Params:
    """Backpropagation through ``unroll.surrogate_loss`` with ``options`` (truncate, checkpoint, ...)."""
    phi = fresh(phi)
    surrogate = unroll.surrogate_loss(problem.inner, problem.K, optimizer=problem.optimizer, outer_fn=problem.outer,
                                      **options)
    value = surrogate(problem.theta0, problem.optimizer.init(problem.theta0), phi)
    return dict(zip(phi, torch.autograd.grad(value, list(phi.values()))))


def exact(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    return Estimate(unrolled_gradient(problem, phi), {})


def checkpointed(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    return Estimate(unrolled_gradient(problem, phi, checkpoint=cfg.checkpoint), {})


def truncated(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    return Estimate(unrolled_gradient(problem, phi, truncate=problem.window), {})


def exact_average(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    """The exact gradient of the mean of outer over theta^1..theta^K: what PES and TBPTT estimate."""
    return Estimate(unrolled_gradient(problem, phi, average_over_steps=True), {})


def implicit(solver: str) -> Strategy:
    def estimate(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
        phi = fresh(phi)
        surrogate = unroll.implicit_loss(problem.inner, problem.K, optimizer=problem.optimizer,
                                         outer_fn=problem.outer, solver=solver, iterations=cfg.implicit_iterations,
                                         tol=cfg.implicit_tol, return_info=True)
        value, info = surrogate(problem.theta0, problem.optimizer.init(problem.theta0), phi)
        grads = torch.autograd.grad(value, list(phi.values()), allow_unused=True, materialize_grads=True)
        return Estimate(dict(zip(phi, grads)), {"iterations": float(info.iterations),
                                                "residual": float(info.residual),
                                                "stationarity": float(info.stationarity)})
    return estimate


def final_loss_fn(problem: Problem) -> Callable[[Params], Tensor]:
    """phi -> outer(theta_K(phi), phi), no graph: what ES perturbs."""
    run = unroll.unrolled_params(problem.inner, problem.K, stop_grad=True, optimizer=problem.optimizer,
                                 check_finite=False)
    state = problem.optimizer.init(problem.theta0)
    return lambda phi: problem.outer(run(problem.theta0, state, phi)[0], phi)


def noise_source(phi: Params, seed: int) -> torch.Generator:
    """ES / PES noise, seeded with ``seed`` on phi's device: unroll.es_gradient and unroll.pes draw their
    perturbations on the parameters' device, so the generator must be there (a CUDA generator draws other numbers
    than a CPU one from the same seed)."""
    return torch.Generator(device=next(iter(phi.values())).device).manual_seed(seed)


def es(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    estimate = unroll.es_gradient(final_loss_fn(problem), sigma=cfg.es_sigma, particles=cfg.es_particles)
    grads, _ = estimate({n: p.detach() for n, p in phi.items()}, noise_source(phi, seed))
    return Estimate(grads, {})


def windows(problem: Problem) -> int:
    return problem.K // problem.window


def tbptt(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
    """Truncated backpropagation over the K/T windows: each window's mean outer loss differentiated through its own
    T steps only (its start a constant), the window gradients averaged."""
    phi = fresh(phi)
    step = unroll.unrolled_params(problem.inner, 1, optimizer=problem.optimizer)
    theta, state = problem.theta0, problem.optimizer.init(problem.theta0)
    total = {n: torch.zeros_like(p) for n, p in phi.items()}
    for _ in range(windows(problem)):
        theta, state = {n: t.detach() for n, t in theta.items()}, {k: v.detach() if isinstance(v, Tensor) else
                                                                      {n: t.detach() for n, t in v.items()}
                                                                      for k, v in state.items()}
        values = []
        for _ in range(problem.window):
            theta, state = step(theta, state, phi)
            values.append(problem.outer(theta, phi))
        for (name, g) in zip(phi, torch.autograd.grad(torch.stack(values).mean(), list(phi.values()))):
            total[name] = total[name] + g / windows(problem)
    return Estimate(total, {})


def persistent_es(persistent: bool) -> Strategy:
    def estimate(cfg: Config, problem: Problem, phi: Params, seed: int) -> Estimate:
        """PES (or truncated ES) over one horizon of K/T windows at a fixed phi, the window estimates averaged:
        an estimate of the gradient of the mean outer loss over theta^1..theta^K."""
        estimator = unroll.pes(problem.inner, problem.window, optimizer=problem.optimizer, horizon=problem.K,
                               sigma=cfg.es_sigma, particles=cfg.pes_particles, outer_fn=problem.outer,
                               persistent=persistent)
        phi = {n: p.detach() for n, p in phi.items()}
        pes_state = estimator.init(problem.theta0, problem.optimizer.init(problem.theta0), phi)
        generator = noise_source(phi, seed)
        total = {n: torch.zeros_like(p) for n, p in phi.items()}
        for _ in range(windows(problem)):
            grads, pes_state, _ = estimator.step(phi, pes_state, generator=generator)
            total = {n: total[n] + grads[n] / windows(problem) for n in total}
        return Estimate(total, {})
    return estimate


@dataclass(frozen=True)
class Estimator:
    label: str
    strategy: Strategy
    target: str                       # "final": outer at theta_K; "average": mean of outer over theta^1..theta^K
    stochastic: bool
    reads: Tuple[str, ...] = ()       # the Config fields its numbers depend on


ESTIMATORS: Dict[str, Estimator] = {
    "exact": Estimator("exact unroll", exact, "final", False),
    "checkpoint": Estimator("exact, checkpoint=N", checkpointed, "final", False, ("checkpoint",)),
    "truncated": Estimator("truncated, truncate=T", truncated, "final", False),
    "implicit_cg": Estimator("implicit, cg", implicit("cg"), "final", False, ("implicit_iterations", "implicit_tol")),
    "implicit_neumann": Estimator("implicit, neumann", implicit("neumann"), "final", False,
                                  ("implicit_iterations", "implicit_tol")),
    "implicit_fixed_point": Estimator("implicit, fixed_point", implicit("fixed_point"), "final", False,
                                      ("implicit_iterations", "implicit_tol")),
    "es": Estimator("ES (es_gradient)", es, "final", True, ("es_sigma", "es_particles")),
    "exact_average": Estimator("exact unroll of the step-averaged loss", exact_average, "average", False),
    "tbptt": Estimator("truncated backprop over windows of T", tbptt, "average", False),
    "pes": Estimator("PES (pes, persistent=True)", persistent_es(True), "average", True, ("es_sigma", "pes_particles")),
    "tes": Estimator("truncated ES (pes, persistent=False)", persistent_es(False), "average", True,
                     ("es_sigma", "pes_particles")),
}
REFERENCE = {"final": "exact", "average": "exact_average"}  # the exact gradient each target is measured against

PROBLEMS: Dict[str, Callable[[int, str], Problem]] = {   # (seed, device) -> Problem
    "hyperparameter": lambda seed, device: problems.hyperparameter(seed, device=device),
    "hyperparameter_converged": lambda seed, device: problems.hyperparameter(seed, weight_decay=0.3, device=device),
    "distillation": lambda seed, device: problems.distillation(seed, device=device),
    "gan": lambda seed, device: problems.gan(seed, device=device),
}


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def device_problem(device: str) -> Optional[str]:
    """None if the run can use ``device`` here, else why not (one line): only the CPU and CUDA, whose time and
    peak memory per gradient this script knows how to measure."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        return "not a device this script runs on; choose cpu or cuda[:N]"
    if kind == "cuda" and not torch.cuda.is_available():
        return f"CUDA is not available here (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    if kind == "cuda" and torch.device(device).index is not None and \
            torch.device(device).index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def synchronize(device: str) -> None:
    """Wait for the kernels queued on ``device``: CUDA runs asynchronously, so a clock read without this would
    time the launches, not the work."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ cells (files)


def names(text: str) -> List[str]:
    return [name for name in text.split(",") if name]


def flat(grads: Params) -> List[float]:
    return torch.cat([g.detach().reshape(-1) for g in grads.values()]).tolist()


def cell_key(cfg: Config, kind: str, problem: str, estimator: str, uses: Sequence[str], **extra: Any
             ) -> Dict[str, Any]:
    """Everything a cell's numbers depend on: the Config fields of the estimators it ``uses``, the device unless it
    is the CPU (so CPU cells keep their names from before ``--device``), and ``extra`` (the code is not in it:
    SCHEMA is bumped when that changes)."""
    reads = sorted({field for name in uses for field in ESTIMATORS[name].reads})
    device = {} if torch.device(cfg.device).type == "cpu" else {"device": cfg.device}
    return {"kind": kind, "problem": problem, "estimator": estimator,
            "settings": {field: getattr(cfg, field) for field in reads}, **device, **extra}


def cell_path(out: Path, key: Dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return out / "cells" / key["kind"] / key["problem"] / f"{key['estimator']}-{digest}.json"


# A small schema language: a type, [item], {key: schema} (exactly these keys), {"*": schema} (any str keys),
# ("optional", schema) for a value that may be null.
NUMBER = ("optional", float)   # strict JSON writes NaN as null
PAYLOADS: Dict[str, Any] = {
    "gradients": {"names": [str], "shapes": [[int]], "seeds": [int], "estimates": [[NUMBER]],
                  "diagnostics": [{"*": NUMBER}], "error": ("optional", str), "seconds": float},
    "timing": {"times": {"*": [NUMBER]}, "estimators": [str], "seconds": float},
    "memory": {"peak_bytes": {"*": int}, "seconds": float},
    "outer": {"runs": [{"seed": int, "validation": [NUMBER], "test": NUMBER, "phi": {"*": [NUMBER]},
                        "error": ("optional", str)}], "seconds": float},
    "controls": {"runs": [{"seed": int, "control": str, "validation": NUMBER, "test": NUMBER}], "seconds": float},
}


def schema_error(value: Any, schema: Any, where: str) -> Optional[str]:
    if isinstance(schema, tuple):
        return None if value is None else schema_error(value, schema[1], where)
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where} is not a list"
        return next((e for i, v in enumerate(value) if (e := schema_error(v, schema[0], f"{where}[{i}]"))), None)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is not an object"
        if "*" in schema:
            return next((e for k, v in value.items() if (e := schema_error(v, schema["*"], f"{where}.{k}"))), None)
        if set(value) != set(schema):
            return f"{where} has keys {sorted(value)}, expected {sorted(schema)}"
        return next((e for k in schema if (e := schema_error(value[k], schema[k], f"{where}.{k}"))), None)
    if schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
    return None if ok else f"{where} is {type(value).__name__}, expected {schema.__name__}"


def read_cell(path: Path, key: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A finished cell, checked against its schema and key; None if there is none; RunError if it is damaged."""
    cell = runs.read_json_file(path)
    if cell is None:
        return None
    problem = (schema_error(cell, {"schema": str, "key": dict, "payload": dict}, "the file")
               or (f"its schema is {cell['schema']!r}, not {SCHEMA!r}" if cell["schema"] != SCHEMA else None)
               or ("its key is not the one its name stands for" if cell["key"] != key else None)
               or schema_error(cell["payload"], PAYLOADS[key["kind"]], "payload"))
    if problem:
        raise runs.RunError(f"{path} is not a cell this run can use ({problem}); it is left as it is: move it away "
                            f"or choose another --out")
    payload: Dict[str, Any] = cell["payload"]
    return payload


def cell(out: Path, key: Dict[str, Any], compute: Callable[[], Dict[str, Any]], log: Callable[[str], None]
         ) -> Dict[str, Any]:
    """The payload of the cell ``key``: read back when a finished one is there, else computed and written."""
    path = cell_path(out, key)
    found = read_cell(path, key)
    if found is not None:
        log(f"kept      {path.relative_to(out)}")
        return found
    payload = compute()
    error = schema_error(payload, PAYLOADS[key["kind"]], "payload")
    assert error is None, error  # a bug here, not a damaged file
    runs.write_json(path, {"schema": SCHEMA, "key": key, "payload": payload})
    log(f"computed  {path.relative_to(out)}")
    return payload


# ------------------------------------------------------------------------------------------------ measurements


def gradients(cfg: Config, problem: Problem, name: str) -> Dict[str, Any]:
    estimator = ESTIMATORS[name]
    seeds = list(range(cfg.seeds if estimator.stochastic else cfg.deterministic_seeds))
    estimates, diagnostics, error = [], [], None
    start = time.perf_counter()
    for seed in seeds:
        try:
            result = estimator.strategy(cfg, problem, problem.phi0, seed)
        except FloatingPointError as failure:  # a solver or a perturbation that blew up is a result, not a crash
            error = f"{type(failure).__name__}: {failure}"
            break
        estimates.append(flat(result.grads))
        diagnostics.append(result.diagnostics)
    return {"names": list(problem.phi0), "shapes": [list(p.shape) for p in problem.phi0.values()], "seeds": seeds,
            "estimates": estimates, "diagnostics": diagnostics, "error": error,
            "seconds": time.perf_counter() - start}


def timing(cfg: Config, problem: Problem, estimators: Sequence[str]) -> Dict[str, Any]:
    """Seconds per gradient of every estimator, in this one process, round-robin (each rep times every estimator
    once, so a busy moment of the machine hits them all), after one untimed warm-up call each; on CUDA from an
    idle device to the end of the gradient's last kernel."""
    def timed(name: str, seed: int) -> float:
        synchronize(cfg.device)
        start = time.perf_counter()
        try:
            ESTIMATORS[name].strategy(cfg, problem, problem.phi0, seed)
        except FloatingPointError:
            return math.nan
        synchronize(cfg.device)
        return time.perf_counter() - start

    start = time.perf_counter()
    for name in estimators:
        timed(name, 0)
    times: Dict[str, List[float]] = {name: [] for name in estimators}
    for rep in range(cfg.timing_reps):
        for name in estimators:
            times[name].append(timed(name, 1 + rep))
    return {"times": times, "estimators": list(estimators), "seconds": time.perf_counter() - start}


def memory(cfg: Config, problem_name: str, estimators: Sequence[str], threads: int) -> Dict[str, Any]:
    """Peak RSS growth of one gradient of each estimator, measured in one fresh interpreter per problem with
    benchmarks/memory.py's probe (malloc hands blocks of 64 KiB or more back to the kernel; the kernel's peak mark
    is reset after a warm-up call of the same estimator, so one-off costs are not counted). On CUDA the caching
    allocator counts every tensor, so the peak (max_memory_allocated above the allocation before the call, after
    the same warm-up) is measured in this process."""
    start = time.perf_counter()
    if is_cuda(cfg.device):
        return {"peak_bytes": peak_bytes(cfg, problem_name, estimators), "seconds": time.perf_counter() - start}
    flags = [f"--{f.name.replace('_', '-')}={getattr(cfg, f.name)}" for f in dataclasses.fields(Config)
             if not isinstance(getattr(cfg, f.name), bool)]
    command = [sys.executable, str(Path(__file__).resolve()), *flags, "--threads", str(threads),
               "--probe-memory", f"{problem_name}:{','.join(estimators)}"]
    env = {**os.environ, **memory_probe.PROBE_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise runs.RunError(f"the memory probe of {problem_name} failed:\n{done.stderr[-2000:]}")
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    return {"peak_bytes": {name: int(peaks[name]) for name in estimators}, "seconds": time.perf_counter() - start}


def peak_bytes(cfg: Config, problem_name: str, estimators: Sequence[str]) -> Dict[str, int]:
    """{estimator: peak growth in bytes} of one gradient each on ``cfg.device``, each after a warm-up call of
    itself: RSS on the CPU (in the probe subprocess), the CUDA allocator's peak on CUDA."""
    problem = PROBLEMS[problem_name](0, cfg.device)
    growth = memory_probe.cuda_peak_growth_bytes if is_cuda(cfg.device) else memory_probe.peak_growth_bytes
    peaks = {}
    for name in estimators:
        def one(strategy: Strategy = ESTIMATORS[name].strategy) -> object:
            try:
                return strategy(cfg, problem, problem.phi0, 0)
            except FloatingPointError:
                return None
        peaks[name] = growth(one, one)
    return peaks


def probe_memory(cfg: Config, target: str) -> None:
    """In the probe subprocess: print {estimator: peak bytes} for one gradient each, ``target`` being
    ``problem:estimator,estimator,...``."""
    problem_name, estimators = target.split(":")
    print(json.dumps(peak_bytes(cfg, problem_name, names(estimators))))


def outer_optimisation(cfg: Config, problem_name: str, name: str) -> Dict[str, Any]:
    """``outer_steps`` Adam steps on phi driven by the estimator, one run per problem seed (its own data draw);
    the final outer loss outer(theta_K(phi), phi) recorded at every step, and the held-out score at the end."""
    start = time.perf_counter()
    records = []
    for seed in range(cfg.outer_seeds):
        problem = PROBLEMS[problem_name](seed, cfg.device)
        phi = fresh(problem.phi0)
        adam = torch.optim.Adam(list(phi.values()), lr=cfg.outer_lr)
        validation, error = [problems.final_outer_loss(problem, phi)], None
        for step in range(cfg.outer_steps):
            try:
                grads = ESTIMATORS[name].strategy(cfg, problem, phi, 10_000 * seed + step).grads
            except FloatingPointError as failure:
                error = f"outer step {step}: {type(failure).__name__}: {failure}"
                break
            for n, p in phi.items():
                p.grad = grads[n].detach().clone()
            adam.step()
            validation.append(problems.final_outer_loss(problem, phi))
        records.append({"seed": seed, "validation": validation,
                        "test": problem.test(problems.trained(problem, phi)),
                        "phi": {n: p.detach().reshape(-1).tolist() for n, p in phi.items()}, "error": error})
    return {"runs": records, "seconds": time.perf_counter() - start}


WEIGHT_DECAY_GRID = tuple(10 ** (e / 4) for e in range(-12, 5))  # 1e-3 .. 10, four per decade


def controls(cfg: Config, problem_name: str) -> Dict[str, Any]:
    """What the outer optimisation is compared with, per problem seed: phi0 untouched, and for the weight-decay
    problem the best weight decay of a grid (chosen on the validation loss, the learning rate left at phi0's)."""
    start = time.perf_counter()
    records = []
    for seed in range(cfg.outer_seeds):
        problem = PROBLEMS[problem_name](seed, cfg.device)
        candidates = {"phi0 (no outer steps)": problem.phi0}
        if "log_weight_decay" in problem.phi0:
            grid = [{**problem.phi0, "log_weight_decay": torch.tensor(math.log(wd), dtype=problems.DTYPE,
                                                                      device=cfg.device)}
                    for wd in WEIGHT_DECAY_GRID]
            candidates[f"best of {len(grid)} weight decays 1e-3..10 (validation)"] = min(
                grid, key=lambda phi: problems.final_outer_loss(problem, phi))
        for label, phi in candidates.items():
            records.append({"seed": seed, "control": label, "validation": problems.final_outer_loss(problem, phi),
                            "test": problem.test(problems.trained(problem, phi))})
    return {"runs": records, "seconds": time.perf_counter() - start}


def measure_problem(cfg: Config, out: Path, problem_name: str, threads: int, log: Callable[[str], None]
                    ) -> Dict[str, Any]:
    """Gradients, timings and peak memory of every chosen estimator (and the exact references) on one problem."""
    problem = PROBLEMS[problem_name](0, cfg.device)
    chosen = list(dict.fromkeys(REFERENCE[ESTIMATORS[n].target] for n in names(cfg.estimators)))
    chosen += [n for n in names(cfg.estimators) if n not in chosen]
    grads = {n: cell(out, cell_key(cfg, "gradients", problem_name, n, [n],
                                   seeds=cfg.seeds if ESTIMATORS[n].stochastic else cfg.deterministic_seeds),
                     functools.partial(gradients, cfg, problem, n), log) for n in chosen}
    times = cell(out, cell_key(cfg, "timing", problem_name, "all", chosen, estimators=chosen, reps=cfg.timing_reps),
                 lambda: timing(cfg, problem, chosen), log)["times"]
    peaks = cell(out, cell_key(cfg, "memory", problem_name, "all", chosen, estimators=chosen),
                 lambda: memory(cfg, problem_name, chosen, threads), log)["peak_bytes"] if cfg.memory else {}
    rows = {n: {"stats": gradient_stats(grads[n], grads[REFERENCE[ESTIMATORS[n].target]]),
                "median_seconds": median_finite(times[n]), "seconds": times[n], "peak_bytes": peaks.get(n),
                "estimates": grads[n]["estimates"] if len(problem.phi0) and sum(
                    p.numel() for p in problem.phi0.values()) <= SMALL_PHI else "in the gradient cells",
                "diagnostics": grads[n]["diagnostics"]} for n in chosen}
    return {"description": problem.description, "K": problem.K, "T": problem.window,
            "phi_size": sum(p.numel() for p in problem.phi0.values()), "estimators": rows}


def measure_outer(cfg: Config, out: Path, problem_name: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """The controls and one outer optimisation per chosen estimator on one problem."""
    outer_key = {"seeds": cfg.outer_seeds, "steps": cfg.outer_steps, "lr": cfg.outer_lr}
    return {"controls": cell(out, cell_key(cfg, "controls", problem_name, "controls", [], seeds=cfg.outer_seeds),
                             lambda: controls(cfg, problem_name), log)["runs"],
            "estimators": {n: cell(out, cell_key(cfg, "outer", problem_name, n, [n], **outer_key),
                                   functools.partial(outer_optimisation, cfg, problem_name, n), log)
                           for n in names(cfg.outer_estimators)}}


# ------------------------------------------------------------------------------------------------ summary


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def median_finite(values: Sequence[Optional[float]]) -> float:
    """The median of the finite values (a failed call is timed as NaN, stored as null); NaN if there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def gradient_stats(cell_: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, Any]:
    """Bias and spread of one estimator against the exact gradient of its target (seed 0 of the reference)."""
    if not cell_["estimates"]:
        return {"error": cell_["error"]}
    estimates = torch.tensor([[math.nan if v is None else v for v in e] for e in cell_["estimates"]],
                             dtype=torch.float64)
    exact_ = torch.tensor(reference["estimates"][0], dtype=torch.float64)
    mean = estimates.mean(0)
    spread = ((estimates - mean).pow(2).sum(1).sum() / max(len(estimates) - 1, 1)).sqrt()
    per_seed_cos = [cosine(e, exact_) for e in estimates]
    diagnostics = {k: statistics.fmean(d[k] for d in cell_["diagnostics"]) for k in cell_["diagnostics"][0]}
    return {"n": len(estimates), "cos_of_mean": cosine(mean, exact_),
            "rel_error_of_mean": float((mean - exact_).norm() / exact_.norm()),
            "cos_per_seed": mean_se(per_seed_cos), "rel_std": float(spread / exact_.norm()),
            "cos_each_seed": per_seed_cos,
            "rel_error_each_seed": [float((e - exact_).norm() / exact_.norm()) for e in estimates],
            "norm_ratio_each_seed": [float(e.norm() / exact_.norm()) for e in estimates],
            "mean": mean.tolist()[:SMALL_PHI], "se": (estimates.std(0) / math.sqrt(len(estimates))).tolist()[:SMALL_PHI]
            if len(estimates) > 1 else [0.0] * min(len(mean), SMALL_PHI), "exact": exact_.tolist()[:SMALL_PHI],
            "exact_norm": float(exact_.norm()), "diagnostics": diagnostics, "error": cell_["error"]}


def fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.2e}"


def pm(mean: float, se: Optional[float], digits: int = 3) -> str:
    """``mean ± se``; the mean alone where the standard error is 0 (deterministic seeds) or undefined (one seed)."""
    return f"{fmt(mean, digits)} ± {fmt(se, 2)}" if se and math.isfinite(se) else fmt(mean, digits)


def outer_mean_se(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    """Mean and standard error over the seeds' finite values (:func:`report.mean_and_se`)."""
    return report.mean_and_se([v for v in values if v is not None and math.isfinite(v)])


def table_cell(text: str) -> str:
    """``text`` on one line, with its pipes escaped, so that it stays one cell of a markdown table."""
    return " ".join(text.splitlines()).replace("|", "\\|")


def mebibytes(peak: Optional[int]) -> str:
    """Growths under 0.1 MiB (a few pages; negative when the heap shrank meanwhile) are below what RSS resolves."""
    if peak is None:
        return "–"
    return "< 0.1" if peak < 0.1 * MiB else f"{peak / MiB:.2g}"


def phi_components(problem_name: str, phi_size: int) -> List[str]:
    """The names of phi's tensors when phi is small enough for its gradients to be shown (one column each), else
    none; building a small problem is cheap (the weight-decay problems)."""
    if phi_size > SMALL_PHI:
        return []
    phi0 = PROBLEMS[problem_name](0, "cpu").phi0
    if sum(p.numel() for p in phi0.values()) != phi_size:
        raise runs.RunError(f"{problem_name}: the results say phi holds {phi_size} numbers, the problem's phi holds "
                            f"{sum(p.numel() for p in phi0.values())}; restore the committed results.json (git)")
    return list(phi0)


def problem_table(components: Sequence[str], rows: Dict[str, Dict[str, Any]]) -> List[str]:
    """The estimators' bias, spread, time and memory on one problem; with ``components`` (a small phi's names,
    :func:`phi_components`) a second table of the gradient's components."""
    lines = ["| estimator | target | cos(mean, exact) | rel. error of mean | cos per seed | rel. std | n | "
             "ms / gradient | peak MiB | implicit: iterations, residual, stationarity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        stats = row["stats"]
        cells = [ESTIMATORS[name].label, ESTIMATORS[name].target]
        if "cos_of_mean" in stats:
            diagnostics = stats["diagnostics"]
            cells += [fmt(stats["cos_of_mean"], 4), fmt(stats["rel_error_of_mean"]), pm(*stats["cos_per_seed"]),
                      fmt(stats["rel_std"]), str(stats["n"])]
        else:
            diagnostics = {}
            cells += ["fails", "–", "–", "–", "0"]
        seconds = row["median_seconds"]  # NaN (null in results.json) when every timed call failed
        cells += [fmt(math.nan if seconds is None else 1000 * seconds), mebibytes(row["peak_bytes"])]
        cells.append(", ".join(fmt(diagnostics[k], 3) for k in ("iterations", "residual", "stationarity"))
                     if diagnostics else table_cell((stats.get("error") or "")[:160]))
        lines.append("| " + " | ".join(cells) + " |")
    if components:  # small phi: the components themselves
        lines += ["", "| estimator | " + " | ".join(f"d/d {n} (mean ± s.e.)" for n in components) + " |",
                  "|---|" + "---|" * len(components)]
        for name, row in rows.items():
            stats = row["stats"]
            if "mean" in stats:
                lines.append(f"| {ESTIMATORS[name].label} | " + " | ".join(
                    pm(m, s, 4) for m, s in zip(stats["mean"], stats["se"])) + " |")
    return lines


def outer_table(cfg: Config, outer_rows: Dict[str, Dict[str, Any]], control_runs: List[Dict[str, Any]]) -> List[str]:
    """Mean ± s.e. over the seeds whose run did not diverge (final validation loss above DIVERGED times the first,
    or a non-finite loss raised on the way), the per-seed finals, and how many diverged."""
    lines = [f"| estimator | validation loss after {cfg.outer_steps} outer steps | test loss | per seed (validation) | "
             f"diverged |", "|---|---|---|---|---|"]
    for label in dict.fromkeys(r["control"] for r in control_runs):
        chosen = [r for r in control_runs if r["control"] == label]
        lines.append(f"| control: {label} | {pm(*outer_mean_se([r['validation'] for r in chosen]), 4)} | "
                     f"{pm(*outer_mean_se([r['test'] for r in chosen]), 4)} | "
                     f"{', '.join(fmt(r['validation'], 3) for r in chosen)} | – |")
    for name, payload in outer_rows.items():
        kept = [r for r in payload["runs"] if not diverged(r)]
        lines.append(f"| {ESTIMATORS[name].label} | {pm(*outer_mean_se([r['validation'][-1] for r in kept]), 4)} | "
                     f"{pm(*outer_mean_se([r['test'] for r in kept]), 4)} | "
                     f"{', '.join(fmt(r['validation'][-1], 3) for r in payload['runs'])} | "
                     f"{len(payload['runs']) - len(kept)} |")
    return lines


def diverged(run: Dict[str, Any]) -> bool:
    final, first = run["validation"][-1], run["validation"][0]
    return run["error"] is not None or final is None or not final <= DIVERGED * first


def plot(path: Path, cfg: Config, summary: Dict[str, Any]) -> None:
    """One panel per problem (per-seed cosine with the exact gradient of the target against time per gradient,
    one colour per estimator) and one per outer optimisation (median validation loss over seeds per step)."""
    plt = pyplot()
    from matplotlib import ticker
    panels = len(summary["problems"]) + len(summary["outer"])
    columns = min(3, panels)
    fig, axes = plt.subplots((panels + columns - 1) // columns, columns, figsize=(5.2 * columns,
                             4.2 * ((panels + columns - 1) // columns)), squeeze=False)
    colours = {name: plt.get_cmap("tab20")(i / len(ESTIMATORS)) for i, name in enumerate(ESTIMATORS)}
    flat_axes = list(axes.flat)
    for ax, (problem_name, result) in zip(flat_axes, summary["problems"].items()):
        for name, row in result["estimators"].items():
            stats = row["stats"]
            if "cos_per_seed" not in stats or not math.isfinite(row["median_seconds"]):
                continue
            ms = 1000 * row["median_seconds"]
            ax.errorbar(ms, stats["cos_per_seed"][0], yerr=stats["cos_per_seed"][1], fmt="o", ms=5,
                        color=colours[name], label=name)
            ax.annotate(name, (ms, stats["cos_per_seed"][0]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
        ax.set_title(f"{problem_name} (|phi| = {result['phi_size']}, K = {result['K']}, T = {result['T']})",
                     fontsize=9)
        ax.set_xlabel(f"ms per gradient (median, {'1 thread' if not is_cuda(cfg.device) else cfg.device})",
                      fontsize=8)
        ax.set_ylabel("cosine with the exact gradient of its target\n(mean ± s.e. over seeds)", fontsize=8)
    for ax, (problem_name, result) in zip(flat_axes[len(summary["problems"]):], summary["outer"].items()):
        highest = 0.0
        for name, payload in result["estimators"].items():
            curves = torch.tensor([[math.inf if v is None else v for v in r["validation"]] for r in payload["runs"]
                                   if len(r["validation"]) == cfg.outer_steps + 1], dtype=torch.float64)
            if len(curves):
                median = curves.median(0).values
                ax.plot(range(len(median)), median, color=colours[name], label=name, lw=1.3)
                highest = max(highest, float(median[0]))
        for label in dict.fromkeys(r["control"] for r in result["controls"]):
            value = statistics.median(r["validation"] for r in result["controls"] if r["control"] == label)
            ax.axhline(value, ls=":", color="grey", lw=1)
            ax.annotate(label, (cfg.outer_steps, value), fontsize=6, color="grey", ha="right", va="bottom")
        ax.set_ylim(top=1.1 * highest)
        ax.set_title(f"{problem_name}: outer optimisation (median of {cfg.outer_seeds} seeds)", fontsize=9)
        ax.set_xlabel("outer Adam step", fontsize=8)
        ax.set_ylabel("validation loss at theta_K(phi)", fontsize=8)
        ax.legend(fontsize=6)
    for ax in flat_axes[panels:]:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ the results page

DEFAULT_PAGE = ROOT / "docs" / "results" / "estimators.md"
TITLE = "Meta-gradient estimators side by side"
FIGURE_ALT = "per problem: cosine with the exact gradient against time per gradient; outer optimisation curves"
PROGRAM = "examples/estimators/compare.py"
DEFAULT_RUN_NOTE = "   # in an empty folder: = the default run"
NEW_VERDICT = ("\n**Verdict: not written yet.** State which estimator to use and why, with the seeds per estimator, "
               "the problems' K and the outer optimisation's control.\n")
RESULTS_ADVICE = f"restore the committed file (git) or rerun {PROGRAM} with --doc"


def page_results_file(doc: Path) -> Path:
    """The numbers of the page ``doc``: ``results.json`` in the folder of the page's name."""
    return Path(doc).with_suffix("") / "results.json"


def page_figure_file(doc: Path) -> Path:
    return Path(doc).with_suffix("") / "figure.png"


def row_problem(row: Any, phi_size: int, where: str) -> Optional[str]:
    """What is wrong with one (problem, estimator) row of results.json as :func:`problem_table` reads it."""
    problem = schema_error(row, {"stats": dict, "median_seconds": NUMBER, "seconds": [NUMBER],
                                 "peak_bytes": ("optional", int), "estimates": object, "diagnostics": [dict]}, where)
    if problem:
        return problem
    stats = row["stats"]
    if set(stats) == {"error"}:  # no estimate came out: the error says why
        return schema_error(stats, {"error": ("optional", str)}, f"{where}.stats")
    shown = min(phi_size, SMALL_PHI)
    problem = schema_error(stats, {"n": int, "cos_of_mean": NUMBER, "rel_error_of_mean": NUMBER,
                                   "cos_per_seed": [NUMBER], "rel_std": NUMBER, "cos_each_seed": [NUMBER],
                                   "rel_error_each_seed": [NUMBER], "norm_ratio_each_seed": [NUMBER],
                                   "mean": [NUMBER], "se": [NUMBER], "exact": [NUMBER], "exact_norm": NUMBER,
                                   "diagnostics": {"*": NUMBER}, "error": ("optional", str)}, f"{where}.stats")
    if problem:
        return problem
    if len(stats["cos_per_seed"]) != 2:
        return f"{where}.stats.cos_per_seed must be [mean, standard error]"
    if not len(stats["mean"]) == len(stats["se"]) == shown:
        return f"{where}.stats.mean and .se must hold {shown} numbers (phi_size {phi_size})"
    if stats["diagnostics"] and not {"iterations", "residual", "stationarity"} <= set(stats["diagnostics"]):
        return f"{where}.stats.diagnostics must hold iterations, residual and stationarity"
    return None


def results_problem(results: Any) -> Optional[str]:
    """What is wrong with ``results`` (results.json) as the numbers of the page (None when nothing is): the run's
    settings (Config's fields) and one-line ``python examples/estimators/compare.py`` command, its compute time,
    and every problem's and outer optimisation's numbers with the keys and types the tables read, under the names
    of known problems and estimators."""
    problem = schema_error(results, {"config": dict, "command": str, "problems": {"*": dict},
                                     "outer": {"*": dict}, "wall_seconds_this_invocation": float,
                                     "compute_seconds_in_cells": float, "machine": dict}, "the file")
    if problem:
        return problem
    fields = {f.name: type(f.default) for f in dataclasses.fields(Config)}
    for name, value in results["config"].items():
        if name not in fields:
            return f"config.{name} is not a setting of this script"
        if not (runs.is_a(value, fields[name]) or (fields[name] is float and runs.is_a(value, int))):
            return f"config.{name} is {type(value).__name__}, expected {fields[name].__name__}"
    try:
        words = shlex.split(results["command"]) if report.safe_text(results["command"]) else []
    except ValueError:
        words = []
    if words[:2] != ["python", PROGRAM]:
        return f"'command' must be a one-line 'python {PROGRAM} ...' without backticks"
    if not runs.is_a(results["machine"].get("threads"), int):
        return "machine.threads must be an integer"
    for name, result in results["problems"].items():
        where = f"problems.{name}"
        if name not in PROBLEMS:
            return f"{where}: not a problem of this script"
        problem = schema_error(result, {"description": str, "K": int, "T": int, "phi_size": int,
                                        "estimators": {"*": dict}}, where)
        if problem:
            return problem
        for estimator, row in result["estimators"].items():
            if estimator not in ESTIMATORS:
                return f"{where}.estimators.{estimator}: not an estimator of this script"
            problem = row_problem(row, result["phi_size"], f"{where}.estimators.{estimator}")
            if problem:
                return problem
    for name, result in results["outer"].items():
        where = f"outer.{name}"
        problem = ((f"{where}: not a problem of this script" if name not in PROBLEMS else None)
                   or schema_error(result, {"controls": PAYLOADS["controls"]["runs"],
                                            "estimators": {"*": PAYLOADS["outer"]}}, where))
        if problem:
            return problem
        if not all(report.safe_text(r["control"]) for r in result["controls"]):
            return f"{where}.controls: a control's name must be one line without backticks or pipes"
        for estimator, payload in result["estimators"].items():
            if estimator not in ESTIMATORS:
                return f"{where}.estimators.{estimator}: not an estimator of this script"
            if not all(r["validation"] for r in payload["runs"]):
                return f"{where}.estimators.{estimator}: every run's validation curve must hold its first loss"
    return None


def read_results(path: Path) -> Dict[str, Any]:
    """results.json, read as untrusted input (:func:`report.read_numbers`, :func:`results_problem`): a damaged
    file is a one-line error, raised before anything is written."""
    results: Dict[str, Any] = report.read_numbers(path, results_problem, RESULTS_ADVICE)
    return results


def command_without(command: str, *flags_with_value: str) -> str:
    """The run's ``command`` (shell words) without ``flags_with_value`` and their values."""
    words = shlex.split(command)
    return report.command_line(words[1], words[2:], drop_with_value=flags_with_value)


def section_command(results: Dict[str, Any], problems_: str, outer_problems: str) -> str:
    """The command that makes one section's cells alone: the run's own flags (less the output folder and
    ``--resume``) for these problems only."""
    base = report.command_line(PROGRAM, shlex.split(results["command"])[2:], drop=("--resume",),
                               drop_with_value=("--out", "--doc", "--problems", "--outer-problems"))
    quoted = [value if value else '""' for value in (problems_, outer_problems)]
    return f"{base} --problems {quoted[0]} --outer-problems {quoted[1]}"


def regenerate_command(doc: Path) -> str:
    words = ["python", PROGRAM, "--report-only"]
    if Path(doc).resolve() != DEFAULT_PAGE.resolve():
        words += ["--doc", str(doc)]
    return " ".join(shlex.quote(w) for w in words)


def section(doc: Path, name: str, command: str) -> List[str]:
    """A section's opening: its heading (a kept block), then the command that makes its cells with their compute
    time (a kept block: results.json does not hold every cell's time)."""
    return [report.notes_block(doc, f"\n## {name.replace('_', ' ')}\n", f"{name}_heading"), "",
            f"`{command}` {report.notes_block(doc, '', f'{name}_seconds')}".rstrip(), ""]


def page_lines(results: Dict[str, Any], doc: Path) -> List[str]:
    """The page: the title, the opening (the kept verdict and the figure), the kept account of what is run, the
    command that made the numbers and its compute time, one section per problem (the tables of
    :func:`problem_table` between kept blocks), one per outer optimisation (:func:`outer_table`), the command
    that remakes the page, and the kept closing blocks."""
    doc = Path(doc)
    cfg = Config(**results["config"])
    default_run = cfg == Config()
    seconds, threads = results["compute_seconds_in_cells"], results["machine"]["threads"]
    link = report.link_from(doc, page_results_file(doc))
    lines = [f"# {TITLE}", "",
             *report.opening(doc, (page_figure_file(doc), FIGURE_ALT), NEW_VERDICT),
             report.notes_block(doc, "\n## What is run\n", "about"), "",
             *report.made_by(command_without(results["command"], "--doc") + (DEFAULT_RUN_NOTE if default_run else ""),
                             "Every table below was made by the default run:" if default_run else
                             "Every table below was made by:"), "",
             f"It took **{seconds:.0f} s** of wall time ({seconds / 60:.1f} min) on "
             f"{'one thread' if threads == 1 else f'{threads} threads'}. The command above each table reproduces "
             f"that table alone",
             "(its cells are the same). Its time is the compute time of those cells in the default run.", "",
             *report.made_by(regenerate_command(doc), f"This page is remade from [{link}]({link}), measuring "
                             f"nothing and keeping its hand-written text,\nby:"), ""]
    for name, result in results["problems"].items():
        lines += section(doc, name, section_command(results, name, ""))
        lines += problem_table(phi_components(name, result["phi_size"]), result["estimators"]) + [""]
        lines += [report.notes_block(doc, "\n", name), ""]
    for name, result in results["outer"].items():
        lines += section(doc, f"outer_{name}", section_command(results, "", name))
        lines += [report.notes_block(doc, "\n", f"outer_{name}_about"), ""]
        lines += outer_table(cfg, result["estimators"], result["controls"]) + [""]
        lines += [report.notes_block(doc, "\n", f"outer_{name}"), ""]
    lines += [report.notes_block(doc, "\n", "closing"), ""]
    return lines


def write_page(doc: Path, results_file: Path) -> None:
    """Write the page ``doc`` from ``results_file`` (:func:`read_results`: a damaged file is refused before
    anything is written)."""
    results = read_results(results_file)
    report.write_page(Path(doc), page_lines(results, Path(doc)))


def publish(out: Path, doc: Path) -> None:
    """After a run with ``--doc``: copy the run's results.json and figure beside the page, then write the page
    from that copy."""
    report.copy_beside_page(out / "results.json", page_results_file(doc))
    report.copy_beside_page(out / "figure.png", page_figure_file(doc))
    write_page(doc, page_results_file(doc))


# ------------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field (``--field-name``, its type and default), plus the run's own flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{f.metadata['help']} (default: {'on' if default else 'off'})")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f.metadata["help"])
    p.add_argument("--out", default="runs/estimators", help="output folder (default: runs/estimators)")
    p.add_argument("--resume", action="store_true", help="keep the finished cells in --out, compute the rest")
    p.add_argument("--doc", default=None, metavar="PAGE",
                   help="results page: after the run, copy results.json and figure.png into PAGE's folder (PAGE "
                        "without .md) and write PAGE from them, keeping its hand-written blocks (default with "
                        "--report-only: docs/results/estimators.md; a run writes no page without --doc)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: remake --doc from the results.json in its folder")
    p.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)  # the memory subprocess
    add_threads_flag(p)
    return p


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[Config, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    for field_, known in (("problems", PROBLEMS), ("outer_problems", PROBLEMS), ("estimators", ESTIMATORS),
                          ("outer_estimators", ESTIMATORS)):
        unknown = [n for n in names(getattr(cfg, field_)) if n not in known]
        if unknown:
            p.error(f"--{field_.replace('_', '-')}: unknown {unknown}; choose from {', '.join(known)}")
    for field_, low in (("seeds", 1), ("deterministic_seeds", 1), ("timing_reps", 1), ("checkpoint", 1),
                        ("implicit_iterations", 1), ("es_particles", 2), ("pes_particles", 2), ("outer_steps", 0),
                        ("outer_seeds", 1)):
        if getattr(cfg, field_) < low:
            p.error(f"--{field_.replace('_', '-')} must be >= {low}")
    if args.doc is not None and Path(args.doc).suffix.lower() != ".md":
        p.error(f"--doc {args.doc}: a results page is a .md file")
    return cfg, args


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = parse_args(argv)
    if args.report_only:
        doc = Path(args.doc) if args.doc is not None else DEFAULT_PAGE
        write_page(doc, page_results_file(doc))
        print(f"results page: {doc} (from {page_results_file(doc)})")
        return 0
    if device_problem(cfg.device) is not None:
        raise runs.RunError(f"--device {cfg.device!r}: {device_problem(cfg.device)}")
    torch.set_num_threads(args.threads)
    if args.probe_memory:
        probe_memory(cfg, args.probe_memory)
        return 0
    out = Path(args.out)
    if cfg.memory and memory_probe.supported(cfg.device) is not None:
        raise runs.RunError(f"--memory: {memory_probe.supported(cfg.device)}; pass --no-memory")
    started = time.perf_counter()
    command = report.command_line(PROGRAM, argv)

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {text}", flush=True)

    def refuse_a_finished_run() -> None:
        if not args.resume and ((out / "settings.json").exists() or (out / "cells").exists()):
            raise runs.RunError(f"{out} already holds a run; pass --resume to keep its finished cells or choose "
                                f"another --out")

    with runs.claim(out, resume=None, validate=refuse_a_finished_run):
        runs.write_json(out / "settings.json", {"config": dataclasses.asdict(cfg), "command": command})
        summary: Dict[str, Any] = {"config": dataclasses.asdict(cfg), "command": command, "problems": {},
                                   "outer": {}}
        for problem_name in names(cfg.problems):          # ---- the loop: every problem x estimator
            summary["problems"][problem_name] = measure_problem(cfg, out, problem_name, args.threads, log)
        for problem_name in names(cfg.outer_problems):    # ---- the outer optimisation driven by each estimator
            summary["outer"][problem_name] = measure_outer(cfg, out, problem_name, log)
        write_summary(out, cfg, summary, time.perf_counter() - started)
    if args.doc is not None:
        publish(out, Path(args.doc))
        log(f"results page: {args.doc}")
    log(f"done: {out / 'table.md'}")
    return 0


def cell_seconds(out: Path) -> float:
    """Compute time stored in this run's cells (what a run without --resume would take, less start-up)."""
    total = 0.0
    for path in (out / "cells").rglob("*.json"):
        seconds = (runs.read_json(path) or {}).get("payload", {}).get("seconds")
        total += seconds if isinstance(seconds, (int, float)) else 0.0
    return total


def write_summary(out: Path, cfg: Config, summary: Dict[str, Any], wall: float) -> None:
    summary["wall_seconds_this_invocation"] = wall
    summary["compute_seconds_in_cells"] = cell_seconds(out)
    summary["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count(), "load_average_at_end": list(os.getloadavg())}
    where = f"{torch.get_num_threads()} thread(s)"
    if is_cuda(cfg.device):
        summary["machine"].update(device=cfg.device, gpu=torch.cuda.get_device_name(cfg.device),
                                  cuda=torch.version.cuda)
        where = f"{torch.cuda.get_device_name(cfg.device)}, CUDA {torch.version.cuda}, {where} on the host"
    lines = [f"Command: `{summary['command']}`  ", f"Wall time of this invocation: {wall:.0f} s; compute time stored "
             f"in the cells it used: {summary['compute_seconds_in_cells']:.0f} s (torch {torch.__version__}, "
             f"{where}).", ""]
    for problem_name, result in summary["problems"].items():
        lines += [f"### {problem_name}", "", f"{result['description']}; T = {result['T']}; "
                  f"|phi| = {result['phi_size']}.", ""]
        lines += problem_table(phi_components(problem_name, result["phi_size"]), result["estimators"]) + [""]
    for problem_name, result in summary["outer"].items():
        lines += [f"### outer optimisation: {problem_name}", "",
                  f"Adam (lr {cfg.outer_lr}) for {cfg.outer_steps} steps from phi0, {cfg.outer_seeds} seeds (each "
                  f"its own data draw); mean ± s.e. over seeds.", ""]
        lines += outer_table(cfg, result["estimators"], result["controls"]) + [""]
    runs.write_json(out / "results.json", summary)
    runs.atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    if summary["problems"]:
        plot(out / "figure.png", cfg, summary)


if __name__ == "__main__":
    sys.exit(main())
