"""The README's main job (examples/gan/fig2.py): a tiny run writes the figure, the table, the verdict and one
metrics.json per configuration, with paired seeds; bad flags are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "gan" / "fig2.py"
TINY = ["--steps", "4", "--eval-every", "2", "--seeds", "0-1", "--K", "2", "--no-progress"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_tiny_run_writes_figure_table_verdict_and_metrics(tmp_path: Path) -> None:
    done = run(*TINY, "--out", str(tmp_path / "out"), "--workers", "2")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert (out / "fig2.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["unrolled, K=2", "plain GAN, K=0", "control, 3 D steps"]
    assert summary["verdict"] in done.stdout and "| configuration |" in done.stdout
    metrics = sorted(out.glob("fig2/*/metrics.json"))
    assert len(metrics) == 3
    configs = [json.loads(p.read_text()) for p in metrics]
    assert sorted(c["config"]["K"] for c in configs) == [0, 2, 2]
    for meta in configs:
        assert {r["seed"] for r in meta["records"]} == {0, 1}
        assert {"step", "seed", "modes_strict", "hq", "reverse_kl"} <= set(meta["records"][0])
    # Paired seeds: every configuration starts from the same parameters, so step-0 metrics agree.
    first = [{(r["seed"], r["hq"]) for r in meta["records"] if r["step"] == 0} for meta in configs]
    assert first[0] == first[1] == first[2]


def test_one_worker_gives_the_same_numbers(tmp_path: Path) -> None:
    runs_ = [run(*TINY, "--no-control", "--out", str(tmp_path / f"w{w}"), "--workers", str(w)) for w in (1, 2)]
    assert all(r.returncode == 0 for r in runs_), [r.stderr for r in runs_]
    rows = [json.loads((tmp_path / f"w{w}" / "summary.json").read_text())["rows"] for w in (1, 2)]
    assert [r["per_seed"] for r in rows[0]] == [r["per_seed"] for r in rows[1]]


@pytest.mark.parametrize("flags, message", [(["--K", "0"], "--K must be >= 1"), (["--workers", "0"], "--workers"),
                                            (["--seeds", "3-1"], "seeds")])
def test_bad_flags_are_refused_before_work(tmp_path: Path, flags, message: str) -> None:
    done = run(*flags, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out").exists()
