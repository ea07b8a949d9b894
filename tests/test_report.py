"""The results pages' kit (examples/unroll_examples/report.py): numbers over seeds against their formulas, the one
standard-error convention (one seed: no "±"), tables, kept notes, the command stamp and the per-seed JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from unroll_examples import report


def test_standard_error_is_the_sample_std_over_root_n() -> None:
    values = [0.5, 2.0, -1.25, 4.0, 3.5]
    mean = sum(values) / len(values)
    sample_var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    got_mean, got_se = report.mean_and_se(values + [None])  # None: a seed without the metric
    assert got_mean == pytest.approx(mean, rel=1e-15)
    assert got_se == pytest.approx(math.sqrt(sample_var / len(values)), rel=1e-15)


def test_summary_statistics_closed_form() -> None:
    stats = report.summary_stats([1.0, 2.0, 3.0, 6.0])
    assert stats["mean"] == pytest.approx(3.0) and stats["median"] == pytest.approx(2.5) and stats["n"] == 4
    assert stats["se"] == pytest.approx(math.sqrt(14 / 3) / 2)


def test_one_seed_has_no_standard_error_and_shows_no_plus_minus() -> None:
    mean, se = report.mean_and_se([0.25])
    assert mean == 0.25 and math.isnan(se)
    assert report.fmt(report.summary_stats([0.25]), scale=100, digits=1) == "25.0"
    assert report.plus_minus(mean, se, ".4g", ".2g") == "0.25"
    assert all(math.isnan(v) for v in report.mean_and_se([]))
    assert report.fmt(report.summary_stats([])) == "n/a"


def test_plus_minus_formats_mean_and_spread() -> None:
    stats = report.summary_stats([1.0, 2.0])  # se = 0.5
    assert report.fmt(stats, scale=10, digits=1) == "15.0 ± 5.0"
    assert report.plus_minus(-0.0625, 0.01234, "+.3f", ".3f") == "-0.062 ± 0.012"
    assert report.plus_minus(1.0, 0.0) == "1.00 ± 0.00"  # a real zero spread (two equal seeds) is shown


def test_image_tables_follow_the_convention() -> None:
    from unroll_examples import image_experiment as ex

    records = [{"K": 0, "status": "done", "m": 1.0}, {"K": 0, "status": "done", "m": 2.0},
               {"K": 5, "status": "done", "m": 0.25}, {"K": 5, "status": "diverged"}]
    rows = ex.aggregate(records, ("K",), ("m",))
    assert rows[0]["m_se"] == pytest.approx(0.5) and math.isnan(rows[1]["m_se"])
    lines = ex.markdown_table(rows, [("m", "M")], key_names=("K",)).splitlines()
    assert lines[2] == "| 0 | 1.5 ± 0.5 | 2 |" and lines[3] == "| 5 | 0.25 | 1 (+1 diverged) |"


def test_table_is_markdown_that_reads_back() -> None:
    rows = [["a", "1 ± 2"], ["b", ""]]
    text = report.table(rows, ["name", "value"])
    lines = text.splitlines()
    assert lines[:2] == ["| name | value |", "|---|---|"] and len(lines) == 4
    assert [c.strip() for c in lines[2].strip("|").split("|")] == rows[0]
    assert report.table([], ["x"]) == "| x |\n|---|"


def test_notes_survive_a_rewrite_and_default_on_a_new_page(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    assert report.kept_notes(doc, "\nfirst\n") == "\nfirst\n"
    assert report.notes_block(doc) == "<!-- notes --><!-- /notes -->"
    report.write_page(doc, ["# t", "", report.notes_block(doc, "default"), "", "| x |"])
    assert doc.read_text() == "# t\n\n<!-- notes -->default<!-- /notes -->\n\n| x |"
    doc.write_text(doc.read_text().replace("default", "\nby hand, | with a bar\n"))
    assert report.kept_notes(doc, "ignored") == "\nby hand, | with a bar\n"
    doc.write_text("no markers")
    assert report.kept_notes(doc, "fresh") == "fresh"


def test_command_line_quotes_and_drops_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--out", "a b", "--report-only", "--note", "busy machine", "--note=x", "--seeds", "0-4"]
    assert (report.command_line("examples/gan/x.py", argv, drop=("--report-only",), drop_with_value=("--note",))
            == "python examples/gan/x.py --out 'a b' --seeds 0-4")
    monkeypatch.setattr(sys, "argv", ["x.py", "--k", "it's"])
    assert report.command_line("-m benchmarks.x") == "python -m benchmarks.x --k 'it'\"'\"'s'"
    assert report.made_by("cmd", "Status: **complete**. Made by:") == [
        "Status: **complete**. Made by:", "", "```", "cmd", "```"]


def test_per_seed_json_is_strict_and_linked_from_the_page(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    line = report.write_per_seed(doc, tmp_path / "page" / "per_seed.json", {"se": math.nan, "x": (1, 2.5)})
    assert line == "Per-seed numbers: [page/per_seed.json](page/per_seed.json)."
    assert json.loads((tmp_path / "page" / "per_seed.json").read_text()) == {"se": None, "x": [1, 2.5]}
    elsewhere = tmp_path.parent / f"{tmp_path.name}_other.json"
    try:
        assert report.write_per_seed(doc, elsewhere, [], "Every seed:") == f"Every seed: [{elsewhere}]({elsewhere})."
    finally:
        elsewhere.unlink()


def test_plus_minus_sig_rounds_the_spread_to_two_figures_and_the_mean_to_match() -> None:
    # Decimal places written out by hand: 29.1 -> 2 figures need none; 0.4899 -> 2; 0.01037 -> 3 ("0.010").
    assert report.plus_minus_sig(144.33, 29.1) == "144 ± 29"
    assert report.plus_minus_sig(6.0712, 0.4899) == "6.07 ± 0.49"
    assert report.plus_minus_sig(0.29398, 0.010368) == "0.294 ± 0.010"
    assert report.plus_minus_sig(463.3, 134.4) == "463 ± 134"  # never rounds a whole part away
    assert report.plus_minus_sig(0.117, 0.0223, digits=1) == "0.12 ± 0.02"
    # One seed: the mean alone, one figure more than the spread would get, never in e-notation.
    assert report.plus_minus_sig(0.097438, math.nan) == "0.0974" and report.plus_minus_sig(1234.5, math.nan) == "1234"
    assert report.plus_minus_sig(2.0, 0.0) == "2 ± 0"
    # A spread that rounds up to the next power of ten keeps two figures (0.0999 -> 0.10, not 0.100) ...
    assert report.plus_minus_sig(-0.3, 0.09999999) == "-0.30 ± 0.10"
    # ... and a mean that rounds to zero has no sign.
    assert report.plus_minus_sig(-0.04, 5.0) == "0.0 ± 5.0" and report.plus_minus(-0.001, 0.2, ".1f") == "0.0 ± 0.2"
    assert report.plus_minus(-0.0004, math.nan, ".3f") == "0.000"
    assert report.plus_minus(-0.06, 0.2, ".1f") == "-0.1 ± 0.2"


def test_named_notes_blocks_are_kept_apart(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    assert report.notes_markers() == ("<!-- notes -->", "<!-- /notes -->")
    assert report.notes_markers("verdict") == ("<!-- notes:verdict -->", "<!-- /notes:verdict -->")
    with pytest.raises(ValueError, match="notes block name"):
        report.notes_markers("a -->")
    doc.write_text("<!-- notes:verdict -->\nV\n<!-- /notes:verdict -->\n<!-- notes -->N<!-- /notes -->\n"
                   "<!-- notes:run -->R<!-- /notes:run -->")
    assert report.kept_notes(doc, name="verdict") == "\nV\n"
    assert report.kept_notes(doc) == "N" and report.kept_notes(doc, name="run") == "R"
    assert report.kept_notes(doc, "d", name="about") == "d"
    assert report.notes_block(doc, name="run") == "<!-- notes:run -->R<!-- /notes:run -->"


def test_opening_is_the_kept_verdict_then_the_main_figure(tmp_path: Path) -> None:
    doc, figure = tmp_path / "page.md", tmp_path / "page" / "main.png"
    assert report.opening(doc, (figure, "main"), "\nnew\n") == ["<!-- notes:verdict -->\nnew\n<!-- /notes:verdict -->",
                                                                 ""]  # no figure file yet: no broken image
    figure.parent.mkdir()
    figure.write_bytes(b"png")
    doc.write_text("# t\n\n<!-- notes:verdict -->\nkept\n<!-- /notes:verdict -->\n")
    assert report.opening(doc, (figure, "main"), "\nnew\n") == [
        "<!-- notes:verdict -->\nkept\n<!-- /notes:verdict -->", "", "![main](page/main.png)", ""]
    assert report.opening(doc) == ["<!-- notes:verdict -->\nkept\n<!-- /notes:verdict -->", ""]


def test_a_run_file_copied_beside_a_page_replaces_a_link_there_never_its_target(tmp_path: Path) -> None:
    source, outside = tmp_path / "run" / "figure.png", tmp_path / "users_file.png"
    source.parent.mkdir()
    source.write_bytes(b"new figure")
    outside.write_bytes(b"a user's own file")
    target = tmp_path / "page" / "figure.png"
    target.parent.mkdir()
    target.symlink_to(outside)
    report.copy_beside_page(source, target)
    assert not target.is_symlink() and target.read_bytes() == b"new figure"
    assert outside.read_bytes() == b"a user's own file"
    report.copy_beside_page(source, source)  # a page inside the run's folder: nothing to copy
    report.copy_beside_page(tmp_path / "run" / "missing.png", tmp_path / "page" / "missing.png")
    assert source.read_bytes() == b"new figure" and not (tmp_path / "page" / "missing.png").exists()
