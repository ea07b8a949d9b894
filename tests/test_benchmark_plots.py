"""The benchmark pages' figures (benchmarks/plots.py): drawn from stored numbers, one line per method.

The results here are made up (no benchmark runs): values follow a formula, so that what the figure shows can be
checked against an independent computation, and a page rendered from them gives its tables to read back.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List

import pytest

from benchmarks import long_horizon, plots
from benchmarks.methods import describe, unroll_method
from benchmarks.unrolled_gradient import QUICK, main, render_markdown, truncation_methods

DOCS = Path(__file__).resolve().parents[1] / "docs"
METHODS = ("unroll", "higher", "torchopt", "first_order")
MODELS = ("mixture", "conv")
KS = (1, 5, 10, 20)
TRUNCATION_KS = (20, 100)


def time_ms(model: str, threads: int, K: int, index: int) -> float:
    """Made-up medians, slower at 2 threads; conv's grow like K² (a range that needs a logarithmic axis)."""
    return (3.0 * K + 2 * index + 1) * (10 * K if model == "conv" else 1) * (1.5 if threads == 2 else 1.0)


def memory_mib(model: str, K: int, index: int) -> float:
    return 1.5 if index == 3 else (2.0 + K) * (10 if model == "conv" else 1) + 0.2 * index


def truncation_ms(model: str, K: int, index: int) -> float:
    return 10.0 * K * (index + 1) + (5 if model == "conv" else 0)


def made_up_results(device: str = "cpu") -> Dict[str, Any]:
    """Results shaped like run_suite's, with the made-up numbers above."""
    config = {**asdict(QUICK), "device": device, "models": list(MODELS), "methods": list(METHODS), "ks": list(KS),
              "threads": [1, 2], "truncation_ks": list(TRUNCATION_KS)}
    timings = [{"model": model, "threads": threads, "K": K, "method": method,
                "median_ms": time_ms(model, threads, K, index), "times_ms": [time_ms(model, threads, K, index)]}
               for model in MODELS for threads in (1, 2) for K in KS for index, method in enumerate(METHODS)]
    memory = [{"model": model, "K": K, "method": method, "peak_growth_mib": memory_mib(model, K, index)}
              for model in MODELS for K in KS for index, method in enumerate(METHODS)]
    rows = [{"model": model, "K": K, "method": method, "options": describe(method),
             "median_ms": truncation_ms(model, K, index), "times_ms": [truncation_ms(model, K, index)],
             "vs_full": {"max_abs": 0.0, "max_rel": 0.0, "nan": False},
             "peak_growth_mib": truncation_ms(model, K, index) / 7}
            for model in MODELS for K in TRUNCATION_KS for index, method in enumerate(truncation_methods(K))]
    gpu = "NVIDIA H200 (CUDA 13.0)" if device == "cuda" else None
    return {
        "date": "2000-01-01T00:00:00", "total_seconds": 1.0, "load_before": None, "load_after_timing": None,
        "machine": {"cpu": "Test CPU", "cpus": 2, "gpu": gpu, "python": "3", "versions": {"torch": "x"}},
        "config": config, "models": {model: f"{model}: made up" for model in MODELS}, "skipped": {},
        "timings": timings, "checks": [], "memory": memory, "memory_skipped": None, "checkpoint": None,
        "truncation": {"rows": rows, "checks": [], "memory_skipped": None},
        "seeds": None, "seeds_small_batch": None, "seeds_skipped": None,
    }


def lines_of(axis: Any) -> Dict[str, List[List[float]]]:
    return {line.get_label(): [list(map(float, line.get_xdata())), list(map(float, line.get_ydata()))]
            for line in axis.get_lines()}


def test_figure_draws_one_line_per_method_with_the_stored_values() -> None:
    numbers = plots.numbers_from_results(made_up_results())
    fig = plots.draw(numbers)
    axes = fig.axes
    assert len(axes) == 2 * 2 * len(MODELS)  # per model: methods compared and truncated unrolls, two panels each
    for row, model in enumerate(MODELS):
        time_axis, memory_axis = axes[2 * row], axes[2 * row + 1]
        assert model in time_axis.get_title() and "Test CPU" in time_axis.get_title()
        assert time_axis.get_xlabel() == "K (unrolled steps)" and time_axis.get_ylabel() == "time per gradient (ms)"
        assert memory_axis.get_ylabel() == "peak RSS growth (MiB)"
        # The first thread count's medians, K increasing, one line per method.
        assert lines_of(time_axis) == {m: [list(map(float, KS)), [time_ms(model, 1, K, i) for K in KS]]
                                       for i, m in enumerate(METHODS)}
        assert lines_of(memory_axis) == {m: [list(map(float, KS)), [memory_mib(model, K, i) for K in KS]]
                                         for i, m in enumerate(METHODS)}
        assert {t.get_text() for t in time_axis.get_legend().get_texts()} == set(METHODS)
        # conv's times span 40 to 13,400 ms (log axis); the mixture's 4 to 67 ms, K 1 to 20 (linear).
        assert time_axis.get_yscale() == ("log" if model == "conv" else "linear")
        assert time_axis.get_xscale() == "linear"
    labels = ["truncate=1", "truncate=K/2", "truncate=K (full)", "checkpoint=True", "truncate=K/2, checkpoint=True"]
    for row, model in enumerate(MODELS, start=len(MODELS)):
        time_axis = axes[2 * row]
        assert "truncated" in time_axis.get_title() and model in time_axis.get_title()
        assert lines_of(time_axis) == {label: [list(map(float, TRUNCATION_KS)),
                                               [truncation_ms(model, K, i) for K in TRUNCATION_KS]]
                                       for i, label in enumerate(labels)}


def test_truncated_variants_are_named_relative_to_k() -> None:
    assert [plots.truncation_label(describe(m), 20) for m in truncation_methods(20)] == [
        "truncate=1", "truncate=K/2", "truncate=K (full)", "checkpoint=True", "truncate=K/2, checkpoint=True"]
    assert plots.truncation_label("truncate=20 (full gradient)", 20) == "truncate=K (full)"
    assert plots.truncation_label("truncate=1", 2) == "truncate=1"  # K/2 = 1: the smallest truncation keeps its name
    assert plots.truncation_label(describe(unroll_method(truncate=7)), 20) == "truncate=7"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_page_writer_shows_the_figure_and_its_tables_give_the_numbers_back(device: str) -> None:
    results = made_up_results(device)
    page = render_markdown(results, "python -m benchmarks.unrolled_gradient", "benchmarks.png")
    figure_line = f"![{plots.ALT_TEXT}](benchmarks.png)"
    assert page.count(figure_line) == 1
    lines = page.splitlines()
    # Near the top: right after the line that says where and when it ran, before the targets.
    assert lines[lines.index(figure_line) - 2].startswith("Run on ")
    assert lines.index(figure_line) < next(i for i, line in enumerate(lines) if line.startswith("## "))
    from_page, stored = plots.numbers_from_page(page), plots.numbers_from_results(results)
    assert from_page.device == stored.device == ("NVIDIA H200" if device == "cuda" else "CPU (Test CPU)")
    assert [row.title for row in from_page.rows] == [row.title for row in stored.rows]
    for read, kept in zip(from_page.rows, stored.rows):
        for field in ("time", "memory_mib"):
            read_curves, kept_curves = getattr(read, field), getattr(kept, field)
            assert read_curves.keys() == kept_curves.keys()
            for method, per_k in kept_curves.items():
                assert read_curves[method].keys() == per_k.keys()
                # The tables round to 0.1.
                assert all(abs(read_curves[method][K] - value) <= 0.05 + 1e-9 for K, value in per_k.items())


def test_without_a_figure_the_page_shows_none() -> None:
    assert "![" not in render_markdown(made_up_results(), "python -m benchmarks.unrolled_gradient")


def test_plot_only_draws_from_the_page_or_its_json_and_measures_nothing(tmp_path: Path) -> None:
    results = made_up_results()
    page = tmp_path / "bench.md"
    text = render_markdown(results, "python -m benchmarks.unrolled_gradient") + "\n"
    page.write_text(text)
    assert main(["--plot-only", "--out", str(page)]) == {}
    figure = tmp_path / "bench.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.read_text() == text  # the page is not rewritten
    figure.unlink()
    stored = tmp_path / "bench.json"
    stored.write_text(json.dumps(results))
    main(["--plot-only", "--out", str(page), "--json", str(stored)])
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # argparse's error: nothing to draw beside
        main(["--plot-only"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"config": {"models": ["mixture"], "threads": [1]}, "machine": {}, "memory": []}),
     "expected 'timings' to be a list"),
    (json.dumps({**made_up_results(), "timings": [{"model": "mixture", "threads": 1, "K": 1, "method": "unroll",
                                                   "median_ms": "fast"}]}), "finite 'median_ms'"),
])
def test_a_malformed_results_file_is_refused_with_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(plots.MalformedNumbers, match=message) as error:
        plots.load_numbers(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    page = tmp_path / "page.md"
    with pytest.raises(SystemExit) as exit_:
        main(["--plot-only", "--out", str(page), "--json", str(path)])
    assert str(exit_.value).startswith("error: ") and "\n" not in str(exit_.value)
    assert not page.with_suffix(".png").exists()


def test_a_page_without_numbers_or_with_a_bad_cell_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.md"
    empty.write_text("# Benchmarks\n\nNo tables here.\n")
    with pytest.raises(plots.MalformedNumbers, match="no benchmark tables found"):
        plots.load_numbers(empty)
    bad = tmp_path / "bad.md"
    bad.write_text("## mixture: median time per gradient\n\n"
                   "| threads | K | unroll ms |\n|---|---|---|\n| 1 | 5 | n/a |\n")
    with pytest.raises(plots.MalformedNumbers, match="cannot read a number from the cell 'n/a'"):
        plots.load_numbers(bad)
    with pytest.raises(plots.MalformedNumbers, match="cannot read it"):
        plots.load_numbers(tmp_path / "missing.json")


@pytest.mark.parametrize("name, rows", [("benchmarks", 4), ("benchmarks_cuda", 4), ("benchmarks_truncation", 2)])
def test_each_benchmark_page_shows_its_figure_drawn_from_its_tables(name: str, rows: int) -> None:
    page = DOCS / f"{name}.md"
    text = page.read_text()
    assert f"![{plots.ALT_TEXT}]({name}.png)" in text and (DOCS / f"{name}.png").is_file()
    numbers = plots.load_numbers(page)
    assert len(numbers.rows) == rows
    for row in numbers.rows:
        assert row.time and row.time.keys() == row.memory_mib.keys()
        ks = {K for per_k in row.time.values() for K in per_k}
        assert all(per_k.keys() == ks for per_k in row.time.values())  # every method at every K of the table


def test_long_horizon_figure_follows_the_same_convention() -> None:
    def cell(seconds: float, mib: float) -> Dict[str, Any]:
        return {"seconds": [seconds, seconds * 3], "peak_bytes": int(mib * 2 ** 20)}

    not_run = {"skipped": {"seconds": 100, "peak_bytes": 2 ** 30}}
    results: Dict[str, Any] = {
        "device": "cpu", "machine": {"cpu": "Test CPU", "gpu": None},
        "cells": {"conv": {"unroll": {"10": cell(1, 100), "100": cell(10, 1000), "1000": not_run},
                           "unroll:checkpoint": {"10": cell(1, 30), "100": cell(10, 60)},
                           "unroll:checkpoint=8": {"10": cell(1, 30), "100": cell(12, 31)}}}}
    fig = plots.draw(long_horizon.figure_numbers(results))
    time_axis, memory_axis = fig.axes
    assert "conv" in time_axis.get_title() and "Test CPU" in time_axis.get_title()
    # Medians of the calls; the cell not run is left out; 30 to 1,000 MiB is drawn on a log axis.
    assert lines_of(time_axis) == {"plain": [[10.0, 100.0], [2.0, 20.0]],
                                   "checkpoint=True": [[10.0, 100.0], [2.0, 20.0]],
                                   "checkpoint=8": [[10.0, 100.0], [2.0, 24.0]]}
    assert lines_of(memory_axis)["plain"] == [[10.0, 100.0], [100.0, 1000.0]]
    assert memory_axis.get_yscale() == "log" and time_axis.get_ylabel() == "time per gradient (s)"
    assert f"![{plots.ALT_TEXT}](x.png)" in long_horizon.render(
        {**results, "command": "c", "state_bytes": {"conv": 1},
         "machine": {**results["machine"], "cpus": 2, "torch": "x", "date": "d", "load_average": [0, 0, 0]}}, "x.png")
