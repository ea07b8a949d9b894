"""examples/gan/sharpness.py: fine-tuning a finished mixture run one factor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mixture
import sharpness
from unroll_examples.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RUN = ["--K", "1", "--seeds", "0-1", "--eval-every", "2", "--eval-samples", "200", "--batch", "32", "--d-lr", "1e-3",
       "--g-lr", "1e-3", "--no-progress"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sharpness") / "source"
    assert mixture.main(RUN + ["--steps", "4", "--out", str(folder)]) == 0
    return folder


def test_continue_is_the_same_run_trained_longer(source: Path, tmp_path: Path) -> None:
    """"continue" starts from the source's parameters, Adam states and data streams: after 2 more iterations
    its metrics are those of one run trained for 6."""
    longer = tmp_path / "longer"
    assert mixture.main(RUN + ["--steps", "6", "--out", str(longer)]) == 0
    doc = tmp_path / "sharp.md"
    assert sharpness.main(["--from", str(source), "--steps", "2", "--eval-every", "2", "--out",
                           str(tmp_path / "out"), "--doc", str(doc), "--no-progress"]) == 0
    numbers = json.loads((tmp_path / "sharp" / "per_seed.json").read_text())
    assert [v["label"] for v in numbers["variants"]] == [label for label, _ in sharpness.VARIANTS]
    reference = {r["seed"]: r for r in json.loads((longer / "metrics.json").read_text())["records"] if r["step"] == 6}
    continued = {r["seed"]: r for r in numbers["variants"][0]["records"] if r["step"] == 2}
    for seed in (0, 1):
        for key in ("hq", "modes_strict", "modes"):
            assert continued[seed][key] == reference[seed][key]
        assert continued[seed]["reverse_kl"] == pytest.approx(reference[seed]["reverse_kl"], rel=1e-4, abs=1e-6)
    changed = [v for v in numbers["variants"][1:]]
    assert all(v["records"][-1] != numbers["variants"][0]["records"][-1] for v in changed)
    page = doc.read_text()
    assert "python examples/gan/sharpness.py" in page and "| batch ×4, +2 |" in page
    # Rerunning finds every variant done and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("checkpoint.pt")}
    assert sharpness.main(["--from", str(source), "--steps", "2", "--eval-every", "2", "--out",
                           str(tmp_path / "out"), "--doc", str(doc), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("checkpoint.pt")} == stamps


def test_variant_configs_change_one_factor() -> None:
    base = TrainConfig(d_lr=1e-3, g_lr=2e-3, unroll_lr=4e-3, batch=64)
    low = sharpness.variant_config(base, {"lr_scale": 0.1}, 10)
    assert (low.d_lr, low.g_lr, low.unroll_lr, low.batch, low.steps) == pytest.approx((1e-4, 2e-4, 4e-4, 64, 10))
    assert sharpness.variant_config(base, {"batch_scale": 4}, 10).batch == 256
    assert sharpness.variant_config(base, {"loss": "nonsaturating"}, 10).loss == "nonsaturating"


def test_bad_sources_and_seeds_are_one_line_errors(source: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        sharpness.main(["--from", str(source), "--seeds", "7", "--out", str(tmp_path / "o"),
                        "--doc", str(tmp_path / "d.md")])
    assert error.value.code == 2 and "[7] are not in" in capsys.readouterr().err
    assert sharpness.main(["--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                           "--doc", str(tmp_path / "d.md")]) == 2
    assert "no readable metrics.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_source_is_read_from_its_final_state_never_its_checkpoint(source: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """final.pt is what a finished run exports for tools: without it (or with a damaged one) the sharpness sweep
    stops with one line naming it, before any variant is made; the checkpoint is never read."""
    import shutil

    from unroll_examples import runs

    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    (copy / runs.CHECKPOINT).write_bytes(b"garbage the sweep must not read")
    final = runs.read_final(copy / runs.FINAL)
    assert final.step == 4 and final.settings["seeds"] == [0, 1]
    args = ["--from", str(copy), "--steps", "2", "--eval-every", "2", "--out", str(tmp_path / "o"),
            "--doc", str(tmp_path / "d.md"), "--no-progress"]
    (copy / runs.FINAL).unlink()
    assert sharpness.main(args) == 2
    assert "there is no checkpoint" in capsys.readouterr().err and not (tmp_path / "o").exists()
    runs.save_checkpoint({**final.payload(runs.CHECKPOINT_FORMAT)}, copy / runs.FINAL)  # a checkpoint, not a final
    assert sharpness.main(args) == 2
    err = capsys.readouterr().err
    assert "final.pt" in err and "not a 'unroll_examples final v1' one" in err and not (tmp_path / "o").exists()
