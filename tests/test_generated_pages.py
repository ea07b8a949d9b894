"""The results pages remade from their committed numbers (the report kit of examples/unroll_examples/report.py):
docs/results/estimators.md from estimators/results.json (``examples/estimators/compare.py --report-only``) and
docs/results/distill.md from distill/*_metrics.json and distill/measure.json (``examples/distill/page.py``).

Each committed page is remade byte for byte from its committed files; everything outside the hand-written blocks
comes from those files (a page without its blocks remakes the same text around empty blocks); the tables hold the
files' numbers (checked against statistics' own mean and standard error); an edited block survives a remake; a
damaged file (truncated JSON, a NaN literal, a missing key, a null where a number belongs) is refused with one
line naming the file before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import statistics
from pathlib import Path
from typing import Any, List, NamedTuple, Tuple

import compare
import pytest

import page as distill_page
from unroll_examples import REPO_ROOT

COMMITTED = REPO_ROOT / "docs" / "results"


def without_blocks(text: str) -> str:
    """The page with the text of every hand-written block left out (the markers stay)."""
    return re.sub(r"(<!-- notes(?::\w+)? -->).*?(<!-- /notes(?::\w+)? -->)", r"\1\2", text, flags=re.S)


def table_rows(text: str, first_cell: str) -> List[List[str]]:
    """The cells of every generated table row (outside the hand-written blocks) whose first cell is
    ``first_cell``."""
    rows = [line for line in without_blocks(text).splitlines() if line.startswith(f"| {first_cell} |")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def mean_se(values: List[float]) -> Tuple[float, float]:
    """Mean and s / √n with the sample standard deviation, by statistics, independently of report.py."""
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


class Page(NamedTuple):
    """A generated page: the script that writes it (its ``main`` and ``DEFAULT_PAGE``), the flags that remake it
    from its files, and those files (in the folder of the page's name)."""

    script: Any
    remake_flags: List[str]
    numbers: List[str]


PAGES = {
    "estimators": Page(compare, ["--report-only"], ["results.json"]),
    "distill": Page(distill_page, [], ["ipc1_fixed_metrics.json", "ipc10_random_metrics.json",
                                       "ipc10_random_window20_metrics.json", "measure.json"]),
}


@pytest.fixture
def copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copies of the committed pages with their folders, made the pages the scripts write by default."""
    for name, spec in PAGES.items():
        shutil.copyfile(COMMITTED / f"{name}.md", tmp_path / f"{name}.md")
        shutil.copytree(COMMITTED / name, tmp_path / name)
        monkeypatch.setattr(spec.script, "DEFAULT_PAGE", tmp_path / f"{name}.md")
    return tmp_path


def remake(name: str) -> int:
    """Remake the page ``name`` (a copy, :func:`copies`) from its files: the script's exit status."""
    status: int = PAGES[name].script.main(PAGES[name].remake_flags)
    return status


@pytest.mark.parametrize("name", sorted(PAGES))
def test_committed_page_is_remade_byte_identically(copies: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    page = copies / f"{name}.md"
    assert remake(name) == 0
    assert page.read_bytes() == (COMMITTED / f"{name}.md").read_bytes()
    # It opens with its verdict, then its main figure.
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[2] == "<!-- notes:verdict -->" and lines[3].startswith("**Verdict")
    after_verdict = lines[lines.index("<!-- /notes:verdict -->") + 2]
    assert after_verdict.startswith("![") and f"]({name}/" in after_verdict
    # Without its old text the page is the same around empty blocks: nothing outside them is hand-written.
    page.write_text("stale")
    assert remake(name) == 0
    assert without_blocks(page.read_text()) == without_blocks((COMMITTED / f"{name}.md").read_text())


@pytest.mark.parametrize("name", sorted(PAGES))
def test_hand_written_blocks_survive_a_remake(copies: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    page = copies / f"{name}.md"
    text = page.read_text()
    edited = text.replace("<!-- notes:verdict -->\n", "<!-- notes:verdict -->\nAn edited verdict, kept.\n", 1)
    assert edited != text
    page.write_text(edited)
    assert remake(name) == 0
    assert page.read_text() == edited


def damage_truncated(text: str) -> str:
    return text[: len(text) // 2]


def damage_nan(text: str) -> str:
    """A NaN literal where the first non-integer number is."""
    return re.sub(r"(?<=: )-?\d+\.\d+(e-?\d+)?", "NaN", text, count=1)


def damage_missing_key(text: str) -> str:
    data = json.loads(text)
    del data["config"]
    return json.dumps(data)


def damage_null_number(text: str) -> str:
    """``null`` where an integer the tables read belongs (a NaN written by a strict JSON writer)."""
    data = json.loads(text)
    if "results" in data:                      # measure.json
        data["results"][0]["ipc"] = None
    elif "problems" in data:                   # estimators' results.json
        data["problems"]["gan"]["phi_size"] = None
    else:                                      # a distillation run's metrics
        data["rows"][0]["random_init"][0] = None
    return json.dumps(data)


DAMAGES = {"truncated": damage_truncated, "nan": damage_nan, "missing key": damage_missing_key,
           "null number": damage_null_number}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name,file", [(n, f) for n, spec in PAGES.items() for f in spec.numbers])
def test_damaged_numbers_are_refused_before_anything_is_written(copies: Path, name: str, file: str, damage: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    target = copies / name / file
    damaged = DAMAGES[damage](target.read_text())
    assert damaged != target.read_text()
    target.write_text(damaged)
    page = copies / f"{name}.md"
    page.write_text("the page before")
    before = sorted(p.name for p in copies.rglob("*"))
    assert remake(name) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and str(target) in error
    assert page.read_text() == "the page before"
    assert sorted(p.name for p in copies.rglob("*")) == before


# ---- the tables hold the files' numbers


def test_estimators_tables_hold_results_json(copies: Path, capsys: pytest.CaptureFixture) -> None:
    results = json.loads((copies / "estimators" / "results.json").read_text())
    text = (copies / "estimators.md").read_text()
    # The outer optimisation: mean ± s.e. over the seeds of each estimator's final validation loss.
    outer = results["outer"]["hyperparameter"]["estimators"]["exact"]["runs"]
    finals = [r["validation"][-1] for r in outer]
    mean, se = mean_se(finals)
    (row,) = table_rows(text, "exact unroll")[-1:]
    assert row[1] == f"{mean:.4g} ± {se:.2g}"
    assert row[3] == ", ".join(f"{v:.3g}" for v in finals)
    # ES on the distillation problem: the per-seed cosine's mean ± s.e., the cosine of the mean, the seeds.
    es = results["problems"]["distillation"]["estimators"]["es"]["stats"]
    mean, se = mean_se(es["cos_each_seed"])
    es_rows = table_rows(text, "ES (es_gradient)")
    distillation_row = es_rows[4]  # hyperparameter (2 tables), hyperparameter_converged (2), distillation
    assert distillation_row[4] == f"{mean:.3g} ± {se:.2g}"
    assert float(distillation_row[2]) == pytest.approx(es["cos_of_mean"], abs=5e-5)
    assert distillation_row[6] == str(len(es["cos_each_seed"])) == "10"
    # The timing column is the median of the 5 timed calls, in ms.
    seconds = results["problems"]["gan"]["estimators"]["exact"]["seconds"]
    assert table_rows(text, "exact unroll")[-2][7] == f"{1000 * statistics.median(seconds):.3g}"


def test_distill_tables_hold_the_metrics_files(copies: Path, capsys: pytest.CaptureFixture) -> None:
    text = (copies / "distill.md").read_text()
    fixed = json.loads((copies / "distill" / "ipc1_fixed_metrics.json").read_text())
    full = json.loads((copies / "distill" / "ipc10_random_metrics.json").read_text())
    measure = json.loads((copies / "distill" / "measure.json").read_text())

    def cell(values: List[float]) -> str:
        mean, se = mean_se(values)
        return f"{100 * mean:.1f} ± {100 * se:.1f} (n={len(values)})"

    distilled = table_rows(text, "distilled")
    assert distilled[0][2] == f"**{100 * fixed['rows'][0]['fixed_init'][0]:.1f}**"
    assert distilled[0][3] == cell(fixed["rows"][0]["random_init"])
    assert distilled[1][2] == "**" + cell(full["rows"][0]["random_init"]).replace(" (", "** (")
    assert table_rows(text, "distilled, all 100 steps (above)")[0][2] == cell(full["rows"][0]["random_init"])
    random_real = table_rows(text, "random real")
    assert random_real[0][2] == cell(fixed["rows"][1]["fixed_init"])
    # The time and memory table: one row per setting of measure.json, in its order.
    rows = [r for r in without_blocks(text).splitlines() if re.match(r"\| 10{1,2} \| ", r)]
    assert len(rows) == len(measure["results"])
    for row, result in zip(rows, measure["results"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(10 * result["ipc"])
        assert cells[3:] == [f"{result['seconds_per_outer_step']:.2f}", f"{result['peak_rss_growth_mib']:.1f}"]
    # The run table: training and evaluation seconds of each run's metrics.
    (run_row,) = table_rows(text, "ipc 1, fixed")
    assert run_row[1:4] == [f"{fixed['train_seconds']:,.0f} s", f"{fixed['seconds_per_outer_step']:.2f}",
                            f"{fixed['eval_seconds']:,.0f} s"]


def test_distill_per_seed_prose_quotes_the_metrics_files(copies: Path) -> None:
    """The per-seed accuracies the hand-written notes quote are the metrics files' (to one decimal, in order)."""
    text = " ".join((copies / "distill.md").read_text().split())  # the notes wrap their lines
    for name in ("ipc1_fixed", "ipc10_random", "ipc10_random_window20"):
        metrics = json.loads((copies / "distill" / f"{name}_metrics.json").read_text())
        for row in metrics["rows"]:
            for column in ("random_init", "fixed_init"):
                if len(row.get(column, [])) > 1:
                    assert ", ".join(f"{100 * v:.1f}" for v in row[column]) in text, (name, row["data"], column)


def test_an_estimators_run_with_doc_writes_its_page_from_the_results_it_copies(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, doc = tmp_path / "run", tmp_path / "pages" / "tiny.md"
    flags = ["--problems", "gan", "--estimators", "exact,es", "--seeds", "2", "--deterministic-seeds", "1",
             "--timing-reps", "1", "--es-particles", "4", "--no-memory", "--outer-problems", "", "--threads", "1",
             "--out", str(out)]
    assert compare.main(flags + ["--doc", str(doc)]) == 0
    assert (tmp_path / "pages" / "tiny" / "results.json").read_bytes() == (out / "results.json").read_bytes()
    assert (tmp_path / "pages" / "tiny" / "figure.png").read_bytes() == (out / "figure.png").read_bytes()
    text = doc.read_text()
    assert "**Verdict: not written yet.**" in text and "![" in text
    # The command that made the numbers is stamped without --doc, the empty --outer-problems quoted.
    lines = text.splitlines()
    stamped = lines[lines.index("Every table below was made by:") + 3]
    assert stamped == "python examples/estimators/compare.py " + " ".join(shlex.quote(f) for f in flags)
    results = json.loads((out / "results.json").read_text())
    es = results["problems"]["gan"]["estimators"]["es"]["stats"]
    mean, se = mean_se(es["cos_each_seed"])
    assert table_rows(text, "ES (es_gradient)")[0][4] == f"{mean:.3g} ± {se:.2g}"
    assert compare.main(["--report-only", "--doc", str(doc)]) == 0
    assert doc.read_text() == text
