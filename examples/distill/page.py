"""The results page of the dataset distillation (docs/results/distill.md), remade from the numbers committed beside
it, training and measuring nothing: the three runs' ``metrics.json`` (``distill.py``, copied as
``<run>_metrics.json``) and ``measure.json`` (``measure.py``). The tables come from those files; the prose is in
the page's hand-written blocks (``<!-- notes:NAME -->`` ... ``<!-- /notes:NAME -->``), kept across remakes.

    python examples/distill/page.py                    # remake docs/results/distill.md
    python examples/distill/page.py --doc PAGE         # remake PAGE from the files in its folder (PAGE less .md)

Accuracies are mean ± standard error over the evaluation networks (:func:`report.mean_and_se`: s / √n with the
sample standard deviation), in percent to one decimal; a single network's value stands alone.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from unroll_examples import report, runs
from unroll_examples.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PAGE = ROOT / "docs" / "results" / "distill.md"
PROGRAM = "examples/distill/page.py"
TITLE = "Dataset distillation on MNIST (Wang, Zhu, Torralba & Efros, 2018)"
RUNS = ("ipc1_fixed", "ipc10_random", "ipc10_random_window20")  # the page's runs, in its order
MAIN_FIGURE = ("ipc10_random.png",
               "the 100 distilled images for fresh initialisations (rows: the ten groups, columns: classes 0–9)")
CLASSES = 10
ADVICE = "restore the committed file (git) or copy the run's metrics.json / measure.json there again"
NEW_VERDICT = ("\n**Verdict: not written yet.** State what the distilled images reach against the real-image "
               "controls, with the distillation seeds and the evaluation networks behind each number.\n")


def accuracies_problem(values: Any, where: str) -> Optional[str]:
    if not isinstance(values, list) or not values \
            or not all(report.is_finite_number(v) and 0 <= v <= 1 for v in values):
        return f"{where} must be a non-empty list of accuracies between 0 and 1"
    return None


def metrics_problem(metrics: Any) -> Optional[str]:
    """What is wrong with one run's ``metrics.json`` as the page reads it (None when nothing is): its settings
    (ipc, init, K, seed, window), its times, and rows of a one-line training set, a learning rate (a one-line text
    or a positive number), a count of diverged networks and the accuracies from random (and, for a fixed
    initialisation, the fixed) initialisations."""
    if not isinstance(metrics, dict):
        return f"holds a JSON {type(metrics).__name__} where an object is expected"
    for key in ("config", "rows", "train_seconds", "eval_seconds", "seconds_per_outer_step"):
        if key not in metrics:
            return f"has no {key!r}"
    config = metrics["config"]
    if not isinstance(config, dict):
        return "'config' must be an object"
    for key in ("ipc", "K", "seed", "window"):
        if not runs.is_a(config.get(key), int) or config[key] < 0 or (key in ("ipc", "K") and config[key] < 1):
            return f"config.{key} must be a {'positive' if key in ('ipc', 'K') else 'non-negative'} integer"
    if config.get("init") not in ("fixed", "random"):
        return f"config.init must be 'fixed' or 'random', got {config.get('init')!r}"
    for key in ("train_seconds", "eval_seconds", "seconds_per_outer_step"):
        if not report.is_finite_number(metrics[key]) or metrics[key] < 0:
            return f"{key} must be a non-negative number, got {metrics[key]!r}"
    rows = metrics["rows"]
    if not isinstance(rows, list) or not rows:
        return "'rows' must be a non-empty list"
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            return f"{where} must be an object"
        if not report.safe_text(row.get("data")):
            return f"{where}.data must be a one-line name"
        if not (report.safe_text(row.get("lr")) or (report.is_finite_number(row.get("lr")) and row["lr"] > 0)):
            return f"{where}.lr must be a one-line text or a positive number"
        if not runs.is_a(row.get("diverged"), int) or row["diverged"] < 0:
            return f"{where}.diverged must be a non-negative integer"
        columns = ("random_init", "fixed_init") if config["init"] == "fixed" else ("random_init",)
        for column in columns:
            problem = accuracies_problem(row.get(column), f"{where}.{column}")
            if problem:
                return problem
    return None


def measure_problem(measure: Any) -> Optional[str]:
    """What is wrong with ``measure.json`` as the page reads it (None when nothing is): the outer step's K and one
    result per setting (images per class, checkpoint budget, optional window, time and peak memory)."""
    if not isinstance(measure, dict):
        return f"holds a JSON {type(measure).__name__} where an object is expected"
    if not isinstance(measure.get("config"), dict) or not runs.is_a(measure["config"].get("K"), int):
        return "config.K must be an integer"
    results = measure.get("results")
    if not isinstance(results, list) or not results:
        return "'results' must be a non-empty list"
    for i, result in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(result, dict):
            return f"{where} must be an object"
        for key in ("ipc", "checkpoint", "window"):
            value = result.get(key, 0 if key == "window" else None)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "ipc" else 0):
                return f"{where}.{key} must be a {'positive' if key == 'ipc' else 'non-negative'} integer"
        for key in ("seconds_per_outer_step", "peak_rss_growth_mib"):
            if not report.is_finite_number(result.get(key)):
                return f"{where}.{key} must be a finite number, got {result.get(key)!r}"
    return None


def read_files(folder: Path) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """Every run's metrics and measure.json from ``folder``, each read as untrusted input
    (:func:`report.read_numbers`): a damaged file is a one-line error, raised before anything is written."""
    metrics = {name: report.read_numbers(folder / f"{name}_metrics.json", metrics_problem, ADVICE) for name in RUNS}
    return metrics, report.read_numbers(folder / "measure.json", measure_problem, ADVICE)


# ---- the tables


def accuracy(values: Sequence[float], bold: bool = False) -> str:
    """``mean ± s.e. (n=N)`` in percent (one network: its value alone), the mean ± s.e. in bold when ``bold``."""
    mean, se = report.mean_and_se([100 * v for v in values])
    text = report.plus_minus(mean, se, ".1f")
    text = f"**{text}**" if bold else text
    return text if len(values) == 1 else f"{text} (n={len(values)})"


def learning_rate(lr: Any) -> str:
    return lr if isinstance(lr, str) else f"constant {lr:g} (tuned)"


def run_label(config: Dict[str, Any]) -> str:
    return f"ipc {config['ipc']}, {config['init']}" + (f", window {config['window']}" if config["window"] else "")


def accuracy_table(metrics: Dict[str, Any], full: Optional[Dict[str, Any]]) -> List[str]:
    """The held-out accuracies of one run's training sets, the distilled images' first column in bold; for a
    windowed run (``full``: the run with every step differentiated, otherwise the same) the full run's distilled
    images on the second row."""
    config = metrics["config"]
    columns = (["fixed_init"] if config["init"] == "fixed" else []) + ["random_init"]
    titles = {"fixed_init": f"from the fixed init (seed {config['seed']})",
              "random_init": f"from {len(metrics['rows'][0]['random_init'])} fresh random inits"}
    images = config["ipc"] * CLASSES
    rows = []
    for i, row in enumerate(metrics["rows"]):
        label = f"{row['data']}, window {config['window']}" if i == 0 and config["window"] else row["data"]
        rows.append([label, learning_rate(row["lr"])]
                    + [accuracy(row[c], bold=i == 0 and j == 0) for j, c in enumerate(columns)])
        if i == 0 and full is not None:
            rows.append([f"{full['rows'][0]['data']}, all {full['config']['K']} steps (above)",
                         learning_rate(full["rows"][0]["lr"]), accuracy(full["rows"][0]["random_init"])])
    lines = [report.table(rows, [f"training set ({images} images, K = {config['K']} steps)", "learning rate",
                                 *(titles[c] for c in columns)])]
    diverged = [f"{row['data']} ({row['diverged']})" for row in metrics["rows"] if row["diverged"]]
    if diverged:
        lines += ["", f"Networks whose training diverged, scored at chance (10%): {', '.join(diverged)}."]
    return lines


def runs_table(doc: Path, metrics: Dict[str, Dict[str, Any]]) -> List[str]:
    """Each run's training time, time per outer step and evaluation time; its wall time is not in the metrics
    files, so each is a kept block."""
    rows = [[run_label(m["config"]), f"{m['train_seconds']:,.0f} s", f"{m['seconds_per_outer_step']:.2f}",
             f"{m['eval_seconds']:,.0f} s", report.notes_block(doc, "", f"wall_{name}")]
            for name, m in metrics.items()]
    steps = {m["config"].get("steps") for m in metrics.values()}
    training = f"training ({steps.pop()} outer steps)" if len(steps) == 1 and None not in steps else "training"
    return [report.table(rows, ["run", training, "s / outer step", "evaluation", "wall"])]


def measure_table(measure: Dict[str, Any]) -> List[str]:
    """Time and peak memory of one outer step per setting; a checkpoint budget is explained where it first
    appears."""
    K = measure["config"]["K"]
    meaning = {0: "(plain unroll)"}
    rows: List[List[str]] = []
    explained: Set[int] = set()
    for result in measure["results"]:
        budget = result["checkpoint"]
        if budget == 0:
            text = "off"
        else:
            text = str(budget)
            meaning[budget] = ("(every state stored, each step recomputed once)" if budget >= K else "(binomial)")
        if budget not in explained:
            text, explained = f"{text} {meaning[budget]}", explained | {budget}
        window = result.get("window", 0)
        rows.append([str(CLASSES * result["ipc"]), text, f"window of {window}" if window else str(K),
                     f"{result['seconds_per_outer_step']:.2f}", f"{result['peak_rss_growth_mib']:.1f}"])
    return [report.table(rows, ["images", "checkpoint", "differentiated steps", "s / outer step",
                                "peak RSS growth (MiB)"])]


def full_run_of(name: str, metrics: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The run that differentiates every step and is otherwise the windowed run ``name``'s (None for a run
    without a window, or when there is none)."""
    config = metrics[name]["config"]
    if not config["window"]:
        return None
    same = [m for m in metrics.values() if not m["config"]["window"]
            and all(m["config"][k] == config[k] for k in ("ipc", "init", "K", "seed"))]
    return same[0] if same else None


def regenerate_command(doc: Path) -> str:
    words = ["python", PROGRAM] + (["--doc", str(doc)] if Path(doc).resolve() != DEFAULT_PAGE.resolve() else [])
    return " ".join(shlex.quote(w) for w in words)


def page_lines(doc: Path, metrics: Dict[str, Dict[str, Any]], measure: Dict[str, Any]) -> List[str]:
    """The page: the title, the opening (the kept verdict, the main figure), the kept account of what is run and
    its commands, the runs' times, then per run its kept heading and notes around its accuracy table, the time and
    memory table of measure.json between kept blocks, and the command that remakes the page."""
    doc = Path(doc)
    folder = doc.with_suffix("")
    lines = [f"# {TITLE}", "",
             *report.opening(doc, (folder / MAIN_FIGURE[0], MAIN_FIGURE[1]), NEW_VERDICT),
             report.notes_block(doc, "\n## What is run\n", "about"), "",
             *runs_table(doc, metrics), "",
             report.notes_block(doc, "\n## Results\n", "results"), ""]
    for name, run in metrics.items():
        lines += [report.notes_block(doc, f"\n`{name}`:\n", f"{name}_heading"), "",
                  *accuracy_table(run, full_run_of(name, metrics)), "",
                  report.notes_block(doc, "\n", name), ""]
    link = report.link_from(doc, folder)
    lines += [report.notes_block(doc, "\n## Time and memory per outer step\n", "measure_about"), "",
              *measure_table(measure), "",
              report.notes_block(doc, "\n", "measure"), "",
              *report.made_by(regenerate_command(doc), f"This page is remade from the files in [{link}/]({link}/), "
                              f"training and measuring nothing and keeping its hand-written text, by:"), ""]
    return lines


def write_page(doc: Path) -> None:
    """Write the page ``doc`` from the files in its folder (:func:`read_files`: a damaged file is refused before
    anything is written)."""
    metrics, measure = read_files(Path(doc).with_suffix(""))
    report.write_page(Path(doc), page_lines(Path(doc), metrics, measure))


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--doc", default=None, metavar="PAGE",
                   help="the page to remake from the files in its folder (default: docs/results/distill.md)")
    args = p.parse_args(argv)
    doc = Path(args.doc) if args.doc is not None else DEFAULT_PAGE
    if doc.suffix.lower() != ".md":
        p.error(f"--doc {doc}: a results page is a .md file")
    write_page(doc)
    print(f"results page: {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
