"""``--per-seed FILE`` of the image experiment scripts (examples/unroll_examples/image_experiment.py).

Every run's final numbers, without loss curves, histograms or timings, in a small JSON to commit beside a results
page: one entry per run with its K, X and seed, the same numbers as ``results.json``, no long lists, the same
bytes on a rerun; a path that is not a writable ``.json`` file is an argparse error before any work.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest

import cifar10
import colored_mnist
import mnist_rnn
import stacked_mnist
from unroll_examples import image_experiment as ex
from unroll_examples import image_training as it
from unroll_examples import mnist_data as md

needs_real_mnist = pytest.mark.skipif(not md.has_split("test"), reason=md.how_to_get("test"))
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# As tests/test_image_gans.py: two iterations on tiny batches, one worker (the machine is shared).
TINY = ["--steps", "2", "--batch", "4", "--seeds", "0", "1", "--K", "0", "1", "--snapshot-every", "1",
        "--checkpoint-every", "1", "--no-progress", "--workers", "1"]
RUNS = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (K, seed) in the order the scripts list their runs


def read(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())


def walk_lists(value: Any) -> List[list]:
    """Every list anywhere in ``value``."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in walk_lists(v)]
    if isinstance(value, list):
        return [value] + [x for v in value for x in walk_lists(v)]
    return []


def check_against_results(per_seed: Dict[str, Any], results: Dict[str, Any], metrics: List[str]) -> None:
    """One entry per run, in order, with the expected K and seed; each field equal to results.json's record;
    finite metrics; only scalars and short lists."""
    assert per_seed["experiment"] == results["experiment"] and per_seed["command"] == results["command"]
    assert per_seed["settings"] == results["settings"]
    assert not {"wall_seconds", "environment", "table", "deviations"} & set(per_seed)
    entries = per_seed["runs"]
    assert [(e["K"], e["seed"]) for e in entries] == RUNS
    assert len(entries) == len(results["runs"])
    for entry, record in zip(entries, results["runs"]):
        assert entry["run"] == record["run"] and entry["status"] == "done" and entry["step"] == 2
        assert all(entry[k] == record[k] for k in entry)
        assert set(metrics) <= set(entry)
        assert all(isinstance(entry[k], float) and math.isfinite(entry[k]) for k in metrics)
        assert not set(ex.PER_SEED_DROPPED) & set(entry)
        assert not {"losses", "config", "eval_settings"} & set(entry)
        assert not any(isinstance(v, dict) for v in entry.values())
    assert all(len(x) <= ex.PER_SEED_MAX_LIST for x in walk_lists(entries))


@needs_real_mnist
def test_colored_mnist_per_seed_matches_results_and_reruns_byte_identically(tmp_path: Path) -> None:
    out, per_seed = tmp_path / "out", tmp_path / "docs" / "results" / "colored_mnist" / "per_seed.json"
    argv = TINY + ["--eval-samples", "20", "--js-samples", "100", "--out", str(out), "--per-seed", str(per_seed)]
    assert colored_mnist.main(argv) == 0
    first = per_seed.read_bytes()
    results = read(out / "results.json")
    got = read(per_seed)
    check_against_results(got, results, ["js"])
    assert got["eval_settings"] == {"eval_samples": 20, "js_samples": 100}
    assert all(e["X"] == "1/4" and len(e["color_mean"]) == 3 and len(e["color_std"]) == 3 for e in got["runs"])
    assert len(first) < 10_000  # small enough to commit
    shutil.rmtree(out)  # the same command from scratch: the same bytes
    assert colored_mnist.main(argv) == 0
    assert per_seed.read_bytes() == first


@needs_real_mnist
def test_mnist_rnn_per_seed_leaves_out_long_lists(tmp_path: Path) -> None:
    """10 targets: the per-target errors (10 > PER_SEED_MAX_LIST), histogram and edges stay in results.json only."""
    out, per_seed = tmp_path / "out", tmp_path / "per_seed.json"
    argv = TINY + ["--targets", "10", "--lbfgs-iters", "2", "--pairs", "50", "--out", str(out),
                   "--per-seed", str(per_seed)]
    assert mnist_rnn.main(argv) == 0
    results, got = read(out / "results.json"), read(per_seed)
    check_against_results(got, results, ["recon_mse", "mean_distance"])
    assert all(len(r["recon_mse_per_target"]) == 10 and len(r["histogram"]) > ex.PER_SEED_MAX_LIST
               for r in results["runs"])
    assert all(set(e) == {"run", "K", "seed", "status", "recon_mse", "mean_distance", "distance_quartiles", "step"}
               for e in got["runs"])


def test_per_seed_record_rule() -> None:
    """Scalars and short scalar lists stay; mappings, long lists, timings and the divergence message go."""
    done = {"run": "X1_4-K5-seed2", "X": "1/4", "K": 5, "seed": 2, "eval_settings": {"eval_samples": 10},
            "status": "done", "modes": 17, "kl": 4.2, "n_samples": 10, "config": {"K": 5}, "step": 30,
            "losses": [{"step": 1, "d_loss": 1.0, "g_loss": 0.5}], "quartiles": (1.0, 2.0, 3.0),
            "per_target": [0.1] * (ex.PER_SEED_MAX_LIST + 1), "train_seconds": 3.2,
            "seconds_per_iteration": 0.1, "eval_seconds": 0.5}
    assert ex.per_seed_record(done) == {"run": "X1_4-K5-seed2", "X": "1/4", "K": 5, "seed": 2, "status": "done",
                                        "modes": 17, "kl": 4.2, "n_samples": 10, "step": 30,
                                        "quartiles": [1.0, 2.0, 3.0]}
    diverged = {"run": "K1-seed0", "K": 1, "seed": 0, "status": "diverged", "diverged_at": 7,
                "error": "training diverged: ... (/tmp/x/K1-seed0/checkpoint.pt, iteration 5) ...", "step": 6}
    assert ex.per_seed_record(diverged) == {"run": "K1-seed0", "K": 1, "seed": 0, "status": "diverged",
                                            "diverged_at": 7, "step": 6}
    payload = ex.per_seed_payload("x", "python x.py", {"K": [1]}, [diverged, {**diverged, "eval_settings": {}}])
    assert "eval_settings" not in payload and len(payload["runs"]) == 2


@pytest.mark.parametrize("script", [stacked_mnist, colored_mnist, mnist_rnn, cifar10])
@pytest.mark.parametrize("bad, message", [
    ("numbers.txt", "the file name must end in .json"),
    ("numbers", "the file name must end in .json"),
    ("blocker/numbers.json", "its folder cannot be created"),
    ("folder.json", "is a folder"),
])
def test_bad_per_seed_path_is_an_argparse_error_before_training(
        script: Any, bad: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    (tmp_path / "folder.json").mkdir()

    def no_training(self: it.GANTrainer) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(it.GANTrainer, "run", no_training)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        script.main(["--out", str(out), "--per-seed", str(tmp_path / bad), "--data-dir", str(tmp_path / "none")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--per-seed {tmp_path / bad}: {message}" in err and "usage:" in err
    assert not out.exists()  # nothing written: the folder is not even claimed


def test_good_per_seed_path_parses_without_creating_anything(tmp_path: Path) -> None:
    path = tmp_path / "docs" / "results" / "stacked_mnist" / "per_seed.json"
    args, _, _ = stacked_mnist.parse_args(["--out", str(tmp_path / "out"), "--per-seed", str(path)])
    assert args.per_seed == path and not (tmp_path / "docs").exists()
    args, config, _ = cifar10.parse_args(["--out", str(tmp_path / "out")])
    assert args.per_seed is None and "per_seed" not in ex.settings_of(config, cifar10.SETTINGS)  # --resume never
    # compares it
