"""The image experiments' results pages (examples/unroll_examples/image_experiment.py, the report kit of
report.py): each committed page is remade byte for byte from its committed per-seed file by ``--report-only``; its
tables are the per-seed numbers' means and standard errors (checked against statistics' own); the hand-written
blocks survive a remake; a damaged per-seed file is refused with one line before anything is written; a training
run with ``--doc`` writes the page from the per-seed file it has just written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

import cifar10
import colored_mnist
import mnist_rnn
import stacked_mnist
from unroll_examples import REPO_ROOT
from unroll_examples import image_experiment as ex
from unroll_examples import mnist_data as md

needs_real_mnist = pytest.mark.skipif(not md.has_split("test"), reason=md.how_to_get("test"))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCRIPTS = {"stacked_mnist": stacked_mnist, "colored_mnist": colored_mnist, "mnist_rnn": mnist_rnn}
COMMITTED = REPO_ROOT / "docs" / "results"


@pytest.fixture
def results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the three committed pages with their folders (per-seed files, figures), made the place where
    ``--report-only`` looks by default."""
    for name in SCRIPTS:
        shutil.copyfile(COMMITTED / f"{name}.md", tmp_path / f"{name}.md")
        shutil.copytree(COMMITTED / name, tmp_path / name)
    monkeypatch.setattr(ex, "RESULTS_DIR", tmp_path)
    return tmp_path


def mean_se_text(values: List[float], decimals: int) -> str:
    """``mean ± s.e.`` by statistics' sample standard deviation over √n, independently of report.py."""
    mean, se = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.{decimals}f} ± {se:.{decimals}f}"


def without_blocks(page: str) -> str:
    """The page with the text of every hand-written block left out (the markers stay)."""
    return re.sub(r"(<!-- notes(?::\w+)? -->).*?(<!-- /notes(?::\w+)? -->)", r"\1\2", page, flags=re.S)


def table_row(page: str, *first_cells: str) -> List[str]:
    """The cells of the generated table row (outside the hand-written blocks) that starts with ``first_cells``."""
    prefix = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in without_blocks(page).splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, prefix
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_committed_page_is_remade_byte_identically_from_its_per_seed_file(results_dir: Path, name: str,
                                                                            capsys: pytest.CaptureFixture) -> None:
    page = results_dir / f"{name}.md"
    page.write_text("stale")  # not read for numbers: only its blocks would be kept, and it has none now
    assert SCRIPTS[name].main(["--report-only"]) == 0
    remade_without_notes = page.read_text()
    shutil.copyfile(COMMITTED / f"{name}.md", page)
    assert SCRIPTS[name].main(["--report-only"]) == 0
    assert page.read_bytes() == (COMMITTED / f"{name}.md").read_bytes()
    # The page opens with its verdict and its main figure, before the settings and commands.
    lines = page.read_text().splitlines()
    assert lines[2] == "<!-- notes:verdict -->" and lines[3].startswith("**Verdict")
    assert "python examples/gan/" + name + ".py --report-only" in page.read_text()
    # Everything outside the hand-written blocks comes from the per-seed file: without the old page it is the same.
    assert without_blocks(remade_without_notes) == without_blocks(page.read_text())
    assert any(header in without_blocks(remade_without_notes) for header in ("| K |", "| row |"))
    assert "Verdict: not written yet" in remade_without_notes
    capsys.readouterr()


def test_stacked_mnist_table_is_the_per_seed_mean_and_standard_error(results_dir: Path) -> None:
    payload = json.loads((results_dir / "stacked_mnist" / "per_seed.json").read_text())
    # Change one seed's modes: the page follows the file, not the old page.
    entry = next(r for r in payload["runs"] if (r["X"], r["K"], r["seed"]) == ("1/2", 5, 1))
    entry["modes"] = 731
    (results_dir / "stacked_mnist" / "per_seed.json").write_text(json.dumps(payload))
    assert stacked_mnist.main(["--report-only"]) == 0
    page = (results_dir / "stacked_mnist.md").read_text()
    modes = [r["modes"] for r in payload["runs"] if (r["X"], r["K"]) == ("1/2", 5)]
    kls = [r["kl"] for r in payload["runs"] if (r["X"], r["K"]) == ("1/2", 5)]
    assert statistics.stdev(modes) / math.sqrt(3) > 100  # a standard error of three digits: no decimals
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in without_blocks(page).splitlines()
            if line.startswith("| 1/2 | K = 5 | ")]
    assert len(rows) == 2  # the table of means, then the row of seeds
    assert rows[0][2:6] == [mean_se_text(modes, 0), mean_se_text(kls, 2), "732.0 ± 44.98", "1.66 ± 0.090"]
    assert rows[1][2:] == [f"{r['modes']} ({r['kl']:.2f})" for r in payload["runs"] if (r["X"], r["K"]) == ("1/2", 5)]


def test_one_seed_shows_its_value_alone_and_a_missing_cell_a_dash(results_dir: Path) -> None:
    path = results_dir / "colored_mnist" / "per_seed.json"
    payload = json.loads(path.read_text())
    payload["settings"]["seeds"] = [0]
    payload["runs"] = [r for r in payload["runs"] if r["seed"] == 0 and r["K"] != 10]
    path.write_text(json.dumps(payload))
    assert colored_mnist.main(["--report-only"]) == 0
    page = (results_dir / "colored_mnist.md").read_text()
    js0 = next(r["js"] for r in payload["runs"] if r["K"] == 0)
    assert js0 < 0.1 and table_row(page, "1/4", "0")[2:4] == [f"{js0:.4f}", f"{js0:.3f}"]  # 3 figures, no "±"
    assert table_row(page, "1/4", "10")[2:4] == ["—", "—"]
    assert "Mean ± standard error over the 1 seed (one seed: its value alone)" in page


def test_mnist_rnn_table_reads_the_summary(results_dir: Path) -> None:
    payload = json.loads((results_dir / "mnist_rnn" / "per_seed.json").read_text())
    assert mnist_rnn.main(["--report-only"]) == 0
    page = (results_dir / "mnist_rnn.md").read_text()
    header = next(line for line in page.splitlines() if line.startswith("| K |"))
    assert f"data: {payload['summary']['data_mean_distance']:.2f})" in header
    for K in (0, 20):
        runs = [r for r in payload["runs"] if r["K"] == K]
        assert table_row(page, str(K)) == [
            str(K), mean_se_text([r["recon_mse"] for r in runs], 3),
            f"{payload['summary']['percent_best'][str(K)]:.2f}%", mean_se_text([r["mean_distance"] for r in runs], 2)]


def test_hand_written_blocks_are_kept_and_the_rest_is_remade(results_dir: Path) -> None:
    page = results_dir / "colored_mnist.md"
    text = page.read_text()
    for block in ("verdict", "about", "run"):
        begin, end = f"<!-- notes:{block} -->", f"<!-- /notes:{block} -->"
        text = text[:text.index(begin) + len(begin)] + f"\nmy {block} text\n" + text[text.index(end):]
    text = text.replace("<!-- notes -->", "<!-- notes -->\nmy notes\n| 1/4 | 0 | a table of my own |")
    generated = "| 1/4 | 5 | 0.168 ± 0.073 | 0.105"
    assert text.count(generated) == 1
    text = text.replace(generated, "| 1/4 | 5 | 9.999 ± 0.073 | 0.105")  # a generated cell, edited by hand
    page.write_text(text)
    assert colored_mnist.main(["--report-only"]) == 0
    remade = page.read_text()
    for block in ("verdict", "about", "run"):
        assert f"<!-- notes:{block} -->\nmy {block} text\n<!-- /notes:{block} -->" in remade
    assert "<!-- notes -->\nmy notes\n| 1/4 | 0 | a table of my own |" in remade
    assert "| 1/4 | 5 | 0.168 ± 0.073 |" in remade and "9.999" not in remade


def damage(path: Path, how: Callable[[Dict[str, Any]], Any]) -> None:
    payload = json.loads(path.read_text())
    result = how(payload)
    path.write_text(result if isinstance(result, str) else json.dumps(payload))


DAMAGES = {
    "truncated": (lambda p: json.dumps(p)[:200], "is not valid JSON"),
    "nan metric": (lambda p: re.sub(r'"js": [-+.0-9e]+', '"js": NaN', json.dumps(p), count=1), "NaN is not a number"),
    "text metric": (lambda p: p["runs"][3].update(js="0.1"), "runs[3].js must be a finite number"),
    "other experiment": (lambda p: p.update(experiment="stacked_mnist"), "not of 'colored_mnist'"),
    "repeated run": (lambda p: p["runs"].append(dict(p["runs"][0])), "repeats the run"),
    "unknown seed": (lambda p: p["runs"][0].update(seed=7), "runs[0].seed must be one of"),
    "bool seed": (lambda p: p["runs"][0].update(seed=True), "runs[0].seed must be one of"),
    "code in command": (lambda p: p.update(command="python examples/gan/colored_mnist.py\n```\nrm -rf /"),
                        "'command' must be a one-line"),
    "other script": (lambda p: p.update(command="python evil.py"), "'command' must be a one-line"),
    "bad size": (lambda p: p["settings"].update(sizes=["1/4 | x"]), "settings.sizes"),
    "no runs": (lambda p: p.update(runs=[]), "'runs' must be a non-empty list"),
    "a list": (lambda p: "[1, 2]", "holds a JSON list"),
    "key twice": (lambda p: json.dumps(p).replace('"experiment"', '"command": "x", "experiment"', 1),
                  "appears twice"),
    "bad status": (lambda p: p["runs"][0].update(status="done?"), "runs[0].status must be one of"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_damaged_per_seed_file_is_refused_in_one_line_before_anything_is_written(
        results_dir: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    how, expected = DAMAGES[kind]
    damage(results_dir / "colored_mnist" / "per_seed.json", how)
    page = results_dir / "colored_mnist.md"
    before = page.read_bytes()
    assert colored_mnist.main(["--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: per-seed file ") and expected in err, err
    assert page.read_bytes() == before
    assert sorted(p.name for p in results_dir.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    # A page that did not exist is not created either.
    new_page = results_dir / "new" / "colored.md"
    shutil.copytree(results_dir / "colored_mnist", new_page.with_suffix(""))
    assert colored_mnist.main(["--report-only", "--doc", str(new_page)]) == 2
    assert not new_page.exists()


def test_damaged_summary_and_oversized_file_are_refused(results_dir: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = results_dir / "mnist_rnn" / "per_seed.json"
    damage(path, lambda p: p["summary"]["percent_best"].update({"0": 140.0}))
    assert mnist_rnn.main(["--report-only"]) == 2
    assert "summary: percent_best['0'] must be a percentage" in capsys.readouterr().err
    monkeypatch.setattr(ex, "PER_SEED_MAX_BYTES", 100)
    assert stacked_mnist.main(["--report-only"]) == 2
    assert "is larger than 100 bytes" in capsys.readouterr().err


def test_missing_per_seed_file_and_a_page_that_is_not_markdown(results_dir: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    (results_dir / "stacked_mnist" / "per_seed.json").unlink()
    assert stacked_mnist.main(["--report-only"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stacked_mnist.main(["--report-only", "--doc", str(results_dir / "page.txt")])
    assert "a results page is a .md file" in capsys.readouterr().err


@needs_real_mnist
def test_a_training_run_with_doc_writes_the_page_from_its_per_seed_file(tmp_path: Path) -> None:
    """Two iterations of two seeds and K = 0, 1 (as tests/test_image_per_seed.py): the page's table is the
    per-seed file's, its figure is copied beside it, and --report-only remakes the same bytes."""
    out, doc = tmp_path / "out", tmp_path / "docs" / "colored.md"
    argv = ["--steps", "2", "--batch", "4", "--seeds", "0", "1", "--K", "0", "1", "--snapshot-every", "1",
            "--checkpoint-every", "1", "--no-progress", "--workers", "1", "--eval-samples", "20", "--js-samples",
            "100", "--out", str(out), "--doc", str(doc)]
    assert colored_mnist.main(argv) == 0
    per_seed = json.loads((tmp_path / "docs" / "colored" / "per_seed.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert [r["js"] for r in per_seed["runs"]] == [r["js"] for r in results["runs"]]
    page = doc.read_text()
    js = [r["js"] for r in per_seed["runs"] if r["K"] == 1]
    decimals = max(0, 1 - math.floor(math.log10(statistics.stdev(js) / math.sqrt(2))))
    assert table_row(page, "1/4", "1")[2] == mean_se_text(js, decimals)
    assert (tmp_path / "docs" / "colored" / "colors.png").is_file()
    assert re.search(r"^!\[[^]]*\]\(colored/colors\.png\)$", page, re.M)
    assert "--doc" in page and "--report-only --doc" in page
    first = doc.read_bytes()
    assert colored_mnist.main(["--report-only", "--doc", str(doc)]) == 0
    assert doc.read_bytes() == first


@needs_real_mnist
def test_mnist_rnn_per_seed_summary_is_results_json_table3(tmp_path: Path) -> None:
    """The per-seed file's summary (what the page's percent best rank and data distance read) is results.json's
    Table 3 and data profile, which compare the runs target by target."""
    out, per_seed = tmp_path / "out", tmp_path / "per_seed.json"
    argv = ["--steps", "2", "--batch", "4", "--seeds", "0", "1", "--K", "0", "1", "--snapshot-every", "1",
            "--checkpoint-every", "1", "--no-progress", "--workers", "1", "--targets", "10", "--lbfgs-iters", "2",
            "--pairs", "50", "--out", str(out), "--per-seed", str(per_seed)]
    assert mnist_rnn.main(argv) == 0
    results, summary = json.loads((out / "results.json").read_text()), json.loads(per_seed.read_text())["summary"]
    assert summary["percent_best"] == {K: row["percent_best"] for K, row in results["diversity_table"].items()}
    assert sum(summary["percent_best"].values()) == pytest.approx(100.0)
    assert summary["data_mean_distance"] == results["data_distance_profile"]["mean_distance"]


def test_cifar10_page_from_a_per_seed_file_of_its_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR-10 has no committed page (no data here): its writer, on numbers made up for the test, shows Table 3's
    layout beside the paper's, a diverged run left out of the means, and the page's opening for a new page."""
    monkeypatch.setattr(ex, "RESULTS_DIR", tmp_path)
    runs = [{"run": f"K{K}-seed{seed}", "K": K, "seed": seed, "status": "done",
             "recon_mse": 0.02 + 0.001 * seed - K / 1000, "mean_distance": 10.0 + K + seed, "step": 50}
            for K in (0, 1) for seed in (0, 1, 2)]
    runs[5] = {"run": "K1-seed2", "K": 1, "seed": 2, "status": "diverged", "step": 20, "diverged_at": 20}
    payload = {"experiment": "cifar10", "command": "python examples/gan/cifar10.py --per-seed x.json",
               "settings": {"K": [0, 1], "seeds": [0, 1, 2], "steps": 50, "out": "runs/cifar10"}, "runs": runs,
               "summary": {"percent_best": {"0": 25.0, "1": 75.0}, "data_mean_distance": 12.3456}}
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "per_seed.json").write_text(json.dumps(payload))
    assert cifar10.main(["--report-only"]) == 0
    page = (tmp_path / "cifar10.md").read_text()
    assert page.startswith("# CIFAR-10") and "Verdict: not written yet" in page and "3 seeds, 50 iterations" in page
    finished = [r for r in runs if r["K"] == 1 and r["status"] == "done"]
    assert table_row(page, "1") == ["1", mean_se_text([r["recon_mse"] for r in finished], 4), "75.00%",
                                    mean_se_text([r["mean_distance"] for r in finished], 2), cifar10.PAPER_TABLE3["1"]]
    assert "mean pair distance (ours; data: 12.35)" in page
    assert "0.0200, 0.0210, 0.0220 (K = 0) against 0.0190, 0.0200, — (K = 1)" in page
