"""examples/gan/collect_runs.py: the per-seed numbers of finished mixture runs, for results pages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import collect_runs
import mixture

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("collect") / "K1_run"
    assert mixture.main(["--K", "1", "--seeds", "0-1", "--steps", "4", "--eval-every", "2", "--eval-samples", "200",
                         "--batch", "32", "--no-progress", "--out", str(folder)]) == 0
    return folder


def test_collects_every_seed_at_every_evaluation(run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "numbers.json"
    assert collect_runs.main([str(run), "--json", str(out), "--at", "2", "4", "3"]) == 0
    collected = json.loads(out.read_text())
    meta = json.loads((run / "metrics.json").read_text())
    assert list(collected) == ["K1_run"]
    assert collected["K1_run"]["config"] == meta["config"] and collected["K1_run"]["seeds"] == [0, 1]
    records = collected["K1_run"]["records"]
    assert [(r["step"], r["seed"]) for r in records] == [(r["step"], r["seed"]) for r in meta["records"]]
    assert all(r["hq"] == m["hq"] and r["modes_strict"] == m["modes_strict"]
               for r, m in zip(records, meta["records"]))
    assert "d_loss" not in records[0]
    at_4 = sorted((r for r in meta["records"] if r["step"] == 4), key=lambda r: r["seed"])
    expected = (f"{at_4[0]['modes_strict']}, {at_4[1]['modes_strict']} / "
                f"{100 * at_4[0]['hq']:.1f}, {100 * at_4[1]['hq']:.1f}")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| K1_run"))
    assert row.split(" | ")[2] == expected
    assert row.rstrip(" |").endswith("not evaluated")  # step 3 has no evaluation


def test_refuses_unfinished_missing_and_duplicate_runs(run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    meta = json.loads((run / "metrics.json").read_text())
    (unfinished / "metrics.json").write_text(json.dumps({**meta, "status": "running"}))
    out = tmp_path / "numbers.json"
    assert collect_runs.main([str(unfinished), "--json", str(out)]) == 2
    assert "not finished" in capsys.readouterr().err
    assert collect_runs.main([str(tmp_path / "nowhere"), "--json", str(out)]) == 2
    assert "no readable metrics.json" in capsys.readouterr().err
    twin = tmp_path / "other" / run.name
    twin.mkdir(parents=True)
    (twin / "metrics.json").write_text((run / "metrics.json").read_text())
    assert collect_runs.main([str(run), str(twin), "--json", str(out)]) == 2
    assert "distinct names" in capsys.readouterr().err
    assert not out.exists()
