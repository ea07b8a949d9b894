"""Long horizons in bounded memory: the plain unroll, ``checkpoint=True`` and ``checkpoint=N`` at K up to 10,000.

    python -m benchmarks.long_horizon --out docs/benchmarks_long_horizon.md            # the page (long: hours)
    python -m benchmarks.long_horizon --models mixture --ks 10 100 --budgets 4 --reps 1  # a smoke run
    python -m benchmarks.long_horizon --device cuda --out $OUT/long_horizon_cuda.md      # on a GPU

One generator gradient of :mod:`benchmarks.models`' problems (the discriminator's Adam unrolled K steps), per
model, K and method, each in a fresh subprocess with 1 thread: peak memory growth during the gradient (the
method of :mod:`benchmarks.memory`: RSS on the CPU, the allocator's peak on CUDA, measured in-process there) and
wall time (median of ``--reps`` calls after a warm-up call at K = 2). Every cell is written to ``--json`` as soon
as it is measured and ``--resume`` skips the cells already there, so a long run survives being stopped. A method
whose memory or time at the next K, extrapolated linearly from its two largest measured K, exceeds
``--memory-limit-gib`` or ``--time-limit-s`` is not run there; the page says what it would need.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import memory, plots
from .methods import describe, make, unroll_method
from .models import MODELS, make_problem

TARGET_K_MEMORY, TARGET_MEMORY_RATIO, TARGET_TIME_RATIO = 1000, 1 / 10, 1.5  # conv, against checkpoint=True
TARGET_K_LONG, TARGET_LONG_MIB = 10_000, 512  # conv, the exact gradient within this growth


def methods(budgets: Sequence[int]) -> List[str]:
    return ["unroll", unroll_method(checkpoint=True)] + [unroll_method(checkpoint=n) for n in budgets]


def state_bytes(model: str) -> int:
    """Bytes of one stored state: the discriminator's parameters and its two Adam buffers."""
    problem = make_problem(model)
    return 3 * sum(p.numel() * p.element_size() for p in problem.discriminator.parameters())


def probe(model: str, method: str, K: int, reps: int, device: str) -> Dict[str, Any]:
    """In this process: peak growth of one gradient, and the times of ``reps`` gradients (that one included)."""
    torch.set_num_threads(1)
    problem = make_problem(model, 0, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm = make(method, problem, 2)
    gradient = make(method, problem, K)
    seconds: List[float] = []

    def timed() -> object:
        sync()
        start = time.perf_counter()
        result = gradient()
        sync()
        seconds.append(time.perf_counter() - start)
        return result

    peak = (memory.cuda_peak_growth_bytes if device == "cuda" else memory.peak_growth_bytes)(timed, warm)
    for _ in range(reps - 1):
        timed()
    return {"peak_bytes": peak, "seconds": seconds}


def measure(model: str, method: str, K: int, reps: int, device: str) -> Dict[str, Any]:
    """:func:`probe` in a fresh interpreter (the CPU's RSS must start clean), or in this process on CUDA."""
    if device == "cuda":
        return probe(model, method, K, reps, device)
    env = {**os.environ, **memory.PROBE_ENV}
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "benchmarks.long_horizon", "--probe", model, method, str(K), str(reps), device]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {model} {method} K={K} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolated(cells: Dict[str, Any], model: str, method: str, K: int) -> Optional[Dict[str, float]]:
    """Memory and time at K from the two largest measured K below it (linear in K), or None with fewer."""
    done = sorted((int(k), cell) for k, cell in cells.get(model, {}).get(method, {}).items()
                  if "peak_bytes" in cell and int(k) < K)
    if len(done) < 2:
        return None
    (k0, a), (k1, b) = done[-2:]
    slope = lambda x0, x1: (x1 - x0) / (k1 - k0)  # noqa: E731
    time0, time1 = statistics.median(a["seconds"]), statistics.median(b["seconds"])
    return {"peak_bytes": b["peak_bytes"] + slope(a["peak_bytes"], b["peak_bytes"]) * (K - k1),
            "seconds": time1 + slope(time0, time1) * (K - k1), "from": [k0, k1]}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    path = Path(args.json)
    results: Dict[str, Any] = json.loads(path.read_text()) if args.resume and path.exists() else {}
    if results and results.get("device") != args.device:
        raise SystemExit(f"error: {path} holds a {results.get('device')} run; use another --json")
    results.update(device=args.device, machine=_machine(args.device), command=_command())
    cells = results.setdefault("cells", {})
    results.setdefault("state_bytes", {}).update({model: state_bytes(model) for model in args.models})
    for model in args.models:
        for K in args.ks:
            for method in methods(args.budgets):
                cell = cells.setdefault(model, {}).setdefault(method, {})
                if "peak_bytes" in cell.get(str(K), {}):
                    continue  # measured by the run this one resumes; a cell it skipped is judged again
                guess = extrapolated(cells, model, method, K)
                reps = args.reps if K <= 100 else 1
                only_budgets = args.budgets_only_above is not None and K > args.budgets_only_above
                if guess and (guess["peak_bytes"] > args.memory_limit_gib * 2 ** 30
                              or guess["seconds"] * reps > args.time_limit_s
                              or (only_budgets and not method.startswith("unroll:checkpoint="))):
                    cell[str(K)] = {"skipped": guess}
                else:
                    print(f"{model} K={K} {describe(method)} ...", file=sys.stderr, flush=True)
                    cell[str(K)] = measure(model, method, K, reps, args.device)
                _write_json(path, results)
    return results


def _write_json(path: Path, results: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def _machine(device: str) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "load_average": list(os.getloadavg())}


def _command() -> str:
    """The command that regenerates the page: this one without --resume and --json (a scratch file)."""
    argv, shown = sys.argv[1:], []
    for i, arg in enumerate(argv):
        if arg == "--resume" or arg == "--json" or (i > 0 and argv[i - 1] == "--json"):
            continue
        shown.append(arg)
    return " ".join(["python -m benchmarks.long_horizon", *shown])


# ------------------------------------------------------------------------------------------------------ the page


def _mib(value: float) -> str:
    return f"{value / 2 ** 20:,.1f}"


def _seconds(cell: Dict[str, Any]) -> float:
    return statistics.median(cell["seconds"])


def table(results: Dict[str, Any], model: str) -> List[str]:
    cells = results["cells"][model]
    reference = unroll_method(checkpoint=True)
    lines = ["| K | method | s per gradient | ÷ checkpoint=True | peak growth MiB | ÷ checkpoint=True |",
             "|---|---|---|---|---|---|"]
    ks = sorted({int(k) for per_k in cells.values() for k in per_k})
    for K in ks:
        ref = cells.get(reference, {}).get(str(K), {})
        for method, per_k in cells.items():
            cell = per_k.get(str(K))
            if cell is None:
                continue
            name = "plain unroll (checkpoint=False)" if method == "unroll" else describe(method)
            if "skipped" in cell:
                guess = cell["skipped"]
                lines.append(f"| {K:,} | {name} | ~{guess['seconds']:,.0f} (not run) | | "
                             f"~{_mib(guess['peak_bytes'])} (not run) | |")
                continue
            time_ratio = f"{_seconds(cell) / _seconds(ref):.2f}×" if "seconds" in ref else ""
            memory_ratio = f"{cell['peak_bytes'] / ref['peak_bytes']:.3f}×" if "peak_bytes" in ref else ""
            lines.append(f"| {K:,} | {name} | {_seconds(cell):,.2f} | {time_ratio} | {_mib(cell['peak_bytes'])} | "
                         f"{memory_ratio} |")
    return lines


def targets(results: Dict[str, Any]) -> List[str]:
    cells = results["cells"].get("conv", {})
    lines = []
    ref = cells.get(unroll_method(checkpoint=True), {}).get(str(TARGET_K_MEMORY), {})
    for method, per_k in cells.items():
        if not method.startswith("unroll:checkpoint="):
            continue
        cell = per_k.get(str(TARGET_K_MEMORY), {})
        if "peak_bytes" in cell and "peak_bytes" in ref:
            memory_ratio = cell["peak_bytes"] / ref["peak_bytes"]
            time_ratio = _seconds(cell) / _seconds(ref)
            met = memory_ratio <= TARGET_MEMORY_RATIO and time_ratio <= TARGET_TIME_RATIO
            lines.append(f"- conv, K = {TARGET_K_MEMORY:,}, {describe(method)}: memory {memory_ratio:.3f}× and time "
                         f"{time_ratio:.2f}× checkpoint=True's (target ≤ {TARGET_MEMORY_RATIO:g}× at ≤ "
                         f"{TARGET_TIME_RATIO}×): {'met' if met else 'not met'}.")
        long = per_k.get(str(TARGET_K_LONG), {})
        if "peak_bytes" in long:
            met = long["peak_bytes"] <= TARGET_LONG_MIB * 2 ** 20
            lines.append(f"- conv, K = {TARGET_K_LONG:,}, {describe(method)}: {_mib(long['peak_bytes'])} MiB growth, "
                         f"{_seconds(long):,.0f} s (target ≤ {TARGET_LONG_MIB} MiB): {'met' if met else 'not met'}.")
    return lines


def floors(results: Dict[str, Any], model: str) -> List[str]:
    """What checkpoint=N cannot go below: one step's backward pass (that step's activations and graph, about the
    plain unroll's peak per step, and as much again in the gradients it computes) plus N + 1 stored states."""
    cells = results["cells"][model]
    plain = cells.get("unroll", {})
    measured = sorted((int(k), c) for k, c in plain.items() if "peak_bytes" in c)
    if not measured:
        return []
    k, cell = measured[0]
    one_step = cell["peak_bytes"] / k
    state = results["state_bytes"][model]
    lines = []
    for method, per_k in cells.items():
        if not method.startswith("unroll:checkpoint="):
            continue
        n = int(method.rsplit("=", 1)[1])
        floor = 2 * one_step + (n + 1) * state
        worst = max((c["peak_bytes"] for c in per_k.values() if "peak_bytes" in c), default=None)
        if worst is not None:
            lines.append(f"- {model}, {describe(method)}: floor {_mib(floor)} MiB (2 × one step's "
                         f"{_mib(one_step)} + {n + 1} states × {_mib(state)}); largest peak measured "
                         f"{_mib(worst)} MiB ({worst / floor:.2f}× the floor).")
    return lines


def figure_numbers(results: Dict[str, Any]) -> plots.BenchmarkFigure:
    """The page's figure (:mod:`benchmarks.plots`): per model, time and peak memory growth against K, one line per
    method, from the measured cells only (cells *not run* are left out)."""
    machine = results["machine"]
    on_gpu = results.get("device") == "cuda"
    rows = []
    for model, per_method in results["cells"].items():
        time: plots.Curves = {}
        peak: plots.Curves = {}
        for method, per_k in per_method.items():
            label = "plain" if method == "unroll" else describe(method)
            for k, cell in per_k.items():
                if "peak_bytes" in cell:
                    time.setdefault(label, {})[int(k)] = _seconds(cell)
                    peak.setdefault(label, {})[int(k)] = cell["peak_bytes"] / 2 ** 20
        rows.append(plots.ModelCurves(model if on_gpu else f"{model} (1 thread)", time, peak))
    device = machine["gpu"] if on_gpu else f"CPU ({machine['cpu']})"
    return plots.BenchmarkFigure(device, tuple(rows), "s",
                                 "peak CUDA memory growth" if on_gpu else "peak RSS growth")


def plot(results: Dict[str, Any], path: Path) -> None:
    plots.write_figure(figure_numbers(results), path)


def render(results: Dict[str, Any], figure: Optional[str]) -> str:
    machine = results["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['cpus']} CPUs, 1 thread"
    lines = ["# Benchmarks: long horizons in bounded memory", "",
             "Regenerate this page (numbers, tables, figure) with:", "", "```", results["command"], "```", "",
             f"Run on {machine['date']} on {where}, torch {machine['torch']}; load average at the start "
             f"{', '.join(f'{x:.2f}' for x in machine['load_average'])}.", ""]
    if figure:
        lines += [f"![{plots.ALT_TEXT}]({figure})", ""]
    if results.get("note"):
        lines += [f"**Note:** {results['note']}", ""]
    lines += ["One generator gradient of the benchmark GANs (`benchmarks/models.py`: the mixture GAN of App. A and "
              "the conv GAN), the discriminator's Adam unrolled K steps, differentiated through every step: the "
              "plain unroll, `checkpoint=True` (every state stored, each step recomputed once) and `checkpoint=N` "
              "(at most N stored states, revolve's schedule). Each cell in a fresh process: peak memory growth "
              "during the gradient (see `benchmarks/memory.py`) and the median wall time of "
              "the calls (the first is the one whose memory is measured; 3 calls for K ≤ 100, 1 above). "
              "Cells marked *not run* would exceed the run's limits; their "
              "numbers are extrapolated linearly from the two largest K measured for that method.", ""]
    for model in results["cells"]:
        lines += [f"## {model}", "", *table(results, model), ""]
    lines += ["## Targets", "", *(targets(results) or ["- not measured in this run"]), "",
              "## How close to the floor", "",
              "With N stored states, memory cannot go below what the backward pass of one step needs (that step's "
              "activations and graph, the plain unroll's peak at the smallest K divided by K, and about as much "
              "again for the gradients it computes) plus N + 1 states (θ^k and its Adam buffers). Measured:", "",
              *[line for model in results["cells"] for line in floors(results, model)], ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe"]:
        model, method, K, reps, device = argv[1:]
        print(json.dumps(probe(model, method, int(K), int(reps), device)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--ks", nargs="+", type=int, default=[10, 100, 1000, 10_000])
    parser.add_argument("--budgets", nargs="+", type=int, default=[8, 32], help="N of checkpoint=N (default 8 32)")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per cell for K <= 100 (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--memory-limit-gib", type=float, default=8.0, help="skip cells predicted above (default 8)")
    parser.add_argument("--time-limit-s", type=float, default=3600.0, help="skip cells predicted above (default 3600)")
    parser.add_argument("--budgets-only-above", type=int, metavar="K",
                        help="above this K run only checkpoint=N; extrapolate the plain unroll and checkpoint=True")
    parser.add_argument("--json", default="runs/long_horizon.json", help="raw results, written cell by cell")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in --json")
    parser.add_argument("--render-only", action="store_true", help="write the page from --json, measuring nothing")
    parser.add_argument("--note", help="a paragraph printed on the page (kept in --json)")
    parser.add_argument("--out", help="write the page here (its figure beside it, same name, .png)")
    args = parser.parse_args(argv)
    if min(args.ks) < 2 or min(args.budgets) < 1 or args.reps < 1:
        parser.error("--ks must be >= 2, --budgets >= 1 and --reps >= 1")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads(Path(args.json).read_text())
    else:
        results = run(args)
    if args.note:
        results["note"] = args.note
        _write_json(Path(args.json), results)
    figure = None
    if args.out:
        out = Path(args.out)
        plot(results, out.with_suffix(".png"))
        figure = out.with_suffix(".png").name
    page = render(results, figure)
    if args.out:
        Path(args.out).write_text(page)
    print(page)


if __name__ == "__main__":
    main()
