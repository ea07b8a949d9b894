"""The figure of a benchmark page: time and peak memory against K, one line per method, two panels per model.

A figure is drawn from stored numbers only, never by measuring again:

- :func:`numbers_from_results`: the results of one run of :mod:`benchmarks.unrolled_gradient` (what its ``--json``
  holds), which its page writer draws from;
- :func:`numbers_from_page`: a page's own tables, for the pages whose results JSON was not kept (the numbers of
  ``docs/benchmarks*.md`` exist only as their tables, rounded to 0.1 ms and 0.1 MiB);
- :mod:`benchmarks.long_horizon` builds :class:`BenchmarkFigure` from its cells itself.

One row of panels per model and section: the method comparison (unroll, higher, torchopt, first_order at the
run's first thread count) and the truncated unrolls (``truncate`` T in {1, K/2, K} and ``checkpoint=True``, 1
thread). The truncated variants are named relative to K (``truncate=K/2``), so that one line joins them across K.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from unroll_examples.plotting import pyplot, save_figure

Curves = Dict[str, Dict[int, float]]
"""method -> K -> value."""

ALT_TEXT = "time and peak memory against K, one line per method"
# One marker per method (hollow), so that lines lying on top of each other stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# A panel's axis turns logarithmic when its largest value exceeds its smallest by this factor.
LOG_RATIO = 25.0


@dataclass(frozen=True)
class ModelCurves:
    """What the two panels of one model show: time per gradient and peak memory growth, each method against K."""

    title: str
    time: Curves
    memory_mib: Curves


@dataclass(frozen=True)
class BenchmarkFigure:
    """A page's figure: its rows of panels, where they ran (``device``) and the unit of ``time`` ("ms" or "s")."""

    device: str
    rows: Tuple[ModelCurves, ...]
    time_unit: str = "ms"
    memory_label: str = "peak memory growth"


class MalformedNumbers(ValueError):
    """Stored numbers that the figure cannot be drawn from; the message is one line naming what is wrong."""


# ------------------------------------------------------------------------------------------ the figure


def _scale(values: Sequence[float]) -> str:
    positive = [v for v in values if v > 0]
    if len(positive) < len(values) or not positive:
        return "linear"
    return "log" if max(positive) / min(positive) > LOG_RATIO else "linear"


def draw(numbers: BenchmarkFigure) -> Any:
    """The matplotlib figure of ``numbers``: per row, time (left) and peak memory (right) against K.

    Each method is one line through its (K, value) points in increasing K; an axis is logarithmic where its
    values span more than :data:`LOG_RATIO`. Returns the figure (not saved; see :func:`write_figure`).
    """
    if not numbers.rows:
        raise MalformedNumbers("no benchmark numbers to draw (no method comparison or truncation rows)")
    plt = pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(len(numbers.rows), 2, figsize=(10, 3.1 * len(numbers.rows) + 0.5), squeeze=False)
    panels = ((f"time per gradient ({numbers.time_unit})", "time"),
              (f"{numbers.memory_label} (MiB)", "memory_mib"))
    for row, model in zip(axes, numbers.rows):
        for axis, (label, field) in zip(row, panels):
            curves: Curves = getattr(model, field)
            for index, (method, per_k) in enumerate(curves.items()):
                ks = sorted(per_k)
                axis.plot(ks, [per_k[k] for k in ks], marker=MARKERS[index % len(MARKERS)], fillstyle="none",
                          label=method)
            ks_all = sorted({k for per_k in curves.values() for k in per_k})
            values = [v for per_k in curves.values() for v in per_k.values()]
            axis.set(xscale=_scale([float(k) for k in ks_all]), yscale=_scale(values),
                     xlabel="K (unrolled steps)", ylabel=label, title=f"{model.title} on {numbers.device}")
            axis.title.set_fontsize(9)
            for scaled, ticks in ((axis.get_xscale(), axis.xaxis), (axis.get_yscale(), axis.yaxis)):
                if scaled == "log":  # plain numbers (20, 100, 1000) rather than powers of ten on every minor tick
                    ticks.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ticks.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
                    ticks.set_minor_formatter(ticker.NullFormatter())
            if ks_all and axis.get_xscale() == "linear":
                axis.set_xticks(ks_all)
            axis.grid(True, which="both", alpha=0.3)
            if not curves:
                axis.text(0.5, 0.5, "not measured", transform=axis.transAxes, ha="center", va="center")
        if row[0].get_lines():
            row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_figure(numbers: BenchmarkFigure, path: Path) -> None:
    """Draw ``numbers`` (:func:`draw`) and write the PNG to ``path``, atomically."""
    save_figure(draw(numbers), Path(path), dpi=90, colors=128)  # a palette: a third of the bytes, same lines


# ------------------------------------------------------------------------------------------ from a run's results


def truncation_label(options: str, K: int) -> str:
    """A truncated variant's options relative to K, e.g. ``truncate=10, checkpoint=True`` at K = 20 ->
    ``truncate=K/2, checkpoint=True``; the full gradient (``truncate=K``) is ``truncate=K (full)``."""
    parts = []
    for part in options.replace(" (full gradient)", "").split(", "):
        name, _, value = part.partition("=")
        if name == "truncate" and value.isdigit():
            T = int(value)
            value = "K (full)" if T == K else ("K/2" if T == max(1, K // 2) and T != 1 else value)
        parts.append(f"{name}={value}" if value else name)
    return ", ".join(parts)


def _require(container: Mapping[str, Any], key: str, kinds: Tuple[type, ...], where: str) -> Any:
    value = container.get(key) if isinstance(container, Mapping) else None
    if not isinstance(value, kinds):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise MalformedNumbers(f"{where}: expected {key!r} to be a {expected}, got {type(value).__name__}")
    return value


def _cell(row: Any, where: str, value_key: str) -> Tuple[str, str, int, float]:
    """``(model, method, K, value)`` of one results row; :class:`MalformedNumbers` if a field is missing."""
    if not isinstance(row, Mapping):
        raise MalformedNumbers(f"{where}: expected rows to be objects, got {row!r}")
    value = row.get(value_key)
    K = row.get("K")
    if (not isinstance(K, int) or isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not isinstance(row.get("model"), str)
            or not isinstance(row.get("method"), str)):
        raise MalformedNumbers(f"{where}: row {dict(row)} needs a model, a method, an integer K and a finite "
                               f"{value_key!r}")
    return row["model"], row["method"], K, float(value)


def _device(machine: Mapping[str, Any], device: str) -> str:
    if device == "cuda" and machine.get("gpu"):
        return str(machine["gpu"]).split(" (CUDA")[0]
    return f"CPU ({machine.get('cpu') or 'unknown'})"


def numbers_from_results(results: Mapping[str, Any], where: str = "results") -> BenchmarkFigure:
    """The figure's numbers in the results of :func:`benchmarks.unrolled_gradient.run_suite` (its ``--json``).

    The comparison rows take the timings at the run's first thread count and the peak memory (1 thread); the
    truncation rows take the truncated variants' medians and peaks. Raises :class:`MalformedNumbers` (one line)
    when a field the figure needs is missing or not a number.
    """
    if not isinstance(results, Mapping):
        raise MalformedNumbers(f"{where}: expected a JSON object of benchmark results, got {type(results).__name__}")
    config = _require(results, "config", (dict,), where)
    machine = _require(results, "machine", (dict,), where)
    models = _require(config, "models", (list, tuple), f"{where} config")
    threads = _require(config, "threads", (list, tuple), f"{where} config")
    timings = _require(results, "timings", (list,), where)
    memory_rows = _require(results, "memory", (list,), where)
    device = str(config.get("device", "cpu"))
    time: Dict[str, Curves] = {model: {} for model in models}
    memory: Dict[str, Curves] = {model: {} for model in models}
    for row in timings:
        model, method, K, ms = _cell(row, f"{where} timings", "median_ms")
        if model in time and row.get("threads") == threads[0]:
            time[model].setdefault(method, {})[K] = ms
    for row in memory_rows:
        model, method, K, mib = _cell(row, f"{where} memory", "peak_growth_mib")
        if model in memory:
            memory[model].setdefault(method, {})[K] = mib
    rows = [ModelCurves(f"{model}, methods{_threads(threads[0], device)}", time[model], memory[model])
            for model in models if time[model] or memory[model]]
    truncation = results.get("truncation")
    if isinstance(truncation, Mapping) and "skipped" not in truncation:
        time = {model: {} for model in models}
        memory = {model: {} for model in models}
        for row in _require(truncation, "rows", (list,), f"{where} truncation"):
            model, _, K, ms = _cell(row, f"{where} truncation", "median_ms")
            if model not in time:
                continue
            label = truncation_label(str(row.get("options")), K)
            time[model].setdefault(label, {})[K] = ms
            if "peak_growth_mib" in row:
                memory[model].setdefault(label, {})[K] = _cell(row, f"{where} truncation", "peak_growth_mib")[3]
        rows += [ModelCurves(f"{model}, truncated unrolls{_threads(1, device)}", time[model], memory[model])
                 for model in models if time[model]]
    return BenchmarkFigure(_device(machine, device), tuple(rows), "ms", _memory_label(device))


def _threads(threads: int, device: str) -> str:
    """What a row's title says about CPU threads: nothing on a GPU (they only launch kernels there)."""
    return "" if device == "cuda" else f" ({threads} thread" + ("s)" if threads != 1 else ")")


def _memory_label(device: str) -> str:
    return "peak CUDA memory growth" if device == "cuda" else "peak RSS growth"


# ------------------------------------------------------------------------------------------ from a page's tables

_RUN_LINE = re.compile(r"Run on \S+ in [\d.]+ s: (?P<cpu>.+?), \d+ CPUs, (?:GPU (?P<gpu>.+?) \(CUDA[^)]*\), )?Python")
_HEADING = re.compile(r"^#+\s+(?P<text>.+?)\s*$")
_VALUE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?:\s*\([^)]*\))?$")


@dataclass(frozen=True)
class _Table:
    heading: str
    header: Tuple[str, ...]
    rows: Tuple[Tuple[str, ...], ...]


def _cells(line: str) -> Tuple[str, ...]:
    return tuple(cell.strip() for cell in line.strip().strip("|").split("|"))


def markdown_tables(text: str) -> List[_Table]:
    """Every pipe table of a Markdown page, with the heading it stands under."""
    tables: List[_Table] = []
    heading = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _HEADING.match(lines[i])
        if match:
            heading = match.group("text")
        is_table = (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                    and re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*\|?", lines[i + 1].strip()) is not None)
        if not is_table:
            i += 1
            continue
        header = _cells(lines[i])
        rows = []
        i += 2
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            rows.append(_cells(lines[i]))
            i += 1
        tables.append(_Table(heading, header, tuple(rows)))
    return tables


def _value(cell: str, where: str) -> Optional[float]:
    """A table cell's number: ``94.4``, ``98.6 (1.04×)``; ``–`` (not measured) is None."""
    if cell in ("–", "-", ""):
        return None
    match = _VALUE.match(cell)
    if match is None:
        raise MalformedNumbers(f"{where}: cannot read a number from the cell {cell!r}")
    return float(match.group("value"))


def _integer(cell: str, where: str) -> int:
    if not cell.isdigit():
        raise MalformedNumbers(f"{where}: expected an integer K or thread count, got the cell {cell!r}")
    return int(cell)


def _method_of_column(column: str, suffix: str) -> Optional[str]:
    """``higher ms (÷ unroll)`` -> ``higher`` for suffix `` ms``; None for other columns."""
    name = column.split(" (")[0]
    return name[: -len(suffix)] if name.endswith(suffix) else None


def numbers_from_page(text: str, where: str = "page") -> BenchmarkFigure:
    """The figure's numbers read back from a benchmark page's tables (as :func:`render_markdown` writes them).

    Tables are recognised by their header: ``threads | K | <method> ms ...`` (timings under ``<model>: median
    time per gradient``; the smallest thread count is kept), ``K | <method> MiB ...`` (peak memory, same
    heading) and ``K | options | median ms | ÷ full | <peak> MiB ...`` (truncated unrolls, under ``<model>``).
    Other tables are ignored. Raises :class:`MalformedNumbers` (one line) on a cell that is not a number or a
    page without any of these tables.
    """
    run = _RUN_LINE.search(text)
    device = "unknown device" if run is None else (run.group("gpu") or f"CPU ({run.group('cpu')})")
    on_gpu = run is not None and run.group("gpu") is not None
    comparison: Dict[str, Tuple[Curves, Curves]] = {}
    truncation: Dict[str, Tuple[Curves, Curves]] = {}
    thread_counts = set()
    for table in markdown_tables(text):
        model = table.heading.split(":")[0].strip()
        context = f"{where}, table under {table.heading!r}"
        header = table.header
        if header[:2] == ("threads", "K"):
            first = min(_integer(row[0], context) for row in table.rows) if table.rows else 1
            thread_counts.add(first)
            time = comparison.setdefault(model, ({}, {}))[0]
            for row in table.rows:
                if _integer(row[0], context) != first:
                    continue
                K = _integer(row[1], context)
                for column, cell in zip(header[2:], row[2:]):
                    method = _method_of_column(column, " ms")
                    value = _value(cell, context) if method else None
                    if method and value is not None:
                        time.setdefault(method, {})[K] = value
        elif header[:1] == ("K",) and len(header) > 1 and all(c.endswith(" MiB") for c in header[1:]):
            memory = comparison.setdefault(model, ({}, {}))[1]
            for row in table.rows:
                K = _integer(row[0], context)
                for column, cell in zip(header[1:], row[1:]):
                    value = _value(cell, context)
                    if value is not None:
                        memory.setdefault(column[: -len(" MiB")], {})[K] = value
        elif header[:3] == ("K", "options", "median ms") and len(header) >= 5:
            time, memory = truncation.setdefault(model, ({}, {}))
            for row in table.rows:
                K = _integer(row[0], context)
                label = truncation_label(row[1], K)
                ms, mib = _value(row[2], context), _value(row[4], context)
                if ms is not None:
                    time.setdefault(label, {})[K] = ms
                if mib is not None:
                    memory.setdefault(label, {})[K] = mib
    if not comparison and not truncation:
        raise MalformedNumbers(f"{where}: no benchmark tables found (timings 'threads | K | ...', memory "
                               "'K | <method> MiB', truncation 'K | options | median ms | ...')")
    threads = min(thread_counts) if thread_counts else 1
    kind = "cuda" if on_gpu else "cpu"
    rows = [ModelCurves(f"{model}, methods{_threads(threads, kind)}", time, memory)
            for model, (time, memory) in comparison.items()]
    rows += [ModelCurves(f"{model}, truncated unrolls{_threads(1, kind)}", time, memory)
             for model, (time, memory) in truncation.items()]
    return BenchmarkFigure(device, tuple(rows), "ms", _memory_label(kind))


def load_numbers(path: Path) -> BenchmarkFigure:
    """The figure's numbers stored in ``path``: a results JSON (``.json``) or a benchmark page (``.md``).

    Raises :class:`MalformedNumbers` with a one-line message naming the file when they cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise MalformedNumbers(f"{path}: cannot read it ({error.strerror or error})") from None
    if path.suffix == ".json":
        try:
            results = json.loads(text)
        except json.JSONDecodeError as error:
            raise MalformedNumbers(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        return numbers_from_results(results, str(path))
    return numbers_from_page(text, str(path))
