"""The controls of the image experiments: committed D steps (``GANConfig.d_steps``), the one-step extrapolation
(``GANConfig.alpha``), their rows in the scripts' tables and per-seed files, and the side-by-side cost match.

Covers: d_steps > 1 is that many torch.optim.Adam steps of D on the iteration's minibatch, then G's plain step;
alpha = 0 and 1 give the K = 0 and K = 1 runs; bad values are refused; the rows of the settings, their run
folders and labels, runs_of keeping a K row apart from its controls; the per-seed check of control rows; the
cost line; and the stacked MNIST page's paired comparisons, against numbers worked out by hand.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import stacked_mnist
from test_image_gans import tiny_gan
from unroll_examples import REPO_ROOT, timing
from unroll_examples import image_experiment as ex
from unroll_examples import image_training as it
from unroll_examples.mnist_data import has_split, how_to_get

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
needs_real_mnist = pytest.mark.skipif(not has_split("test"), reason=how_to_get("test"))


# ------------------------------------------------------------------------------------------ the trainer


def test_d_steps_are_that_many_adam_steps_on_the_minibatch_then_the_plain_generator_step() -> None:
    control = it.GANTrainer(tiny_gan(), it.GANConfig(K=0, d_steps=3, batch=6, steps=3))
    control.train_step()  # the compared iteration starts with Adam states
    by_hand = it.GANTrainer(tiny_gan(), it.GANConfig(K=0, batch=6, steps=3))
    for mine, theirs in ((by_hand.G, control.G), (by_hand.D, control.D), (by_hand.g_opt, control.g_opt),
                         (by_hand.d_opt, control.d_opt)):
        mine.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for mine, theirs in ((by_hand.data_gen, control.data_gen), (by_hand.latent_gen, control.latent_gen)):
        mine.set_state(theirs.get_state())

    d_loss, g_loss = control.train_step()
    x, z = by_hand.draw()
    fake = by_hand.G(z)
    d_losses = []
    for _ in range(3):  # torch.optim.Adam on the same real and generated minibatch, three times
        loss = it.d_loss_from_logits(by_hand.D(x), by_hand.D(fake.detach()))
        d_losses.append(float(loss.detach()))
        by_hand.d_opt.zero_grad()
        loss.backward()
        by_hand.d_opt.step()
    generator_loss = torch.nn.functional.softplus(-by_hand.D(fake)).mean()  # -log D(G(z)) at the new D
    by_hand.g_opt.zero_grad()
    generator_loss.backward()
    by_hand.g_opt.step()
    assert d_loss == pytest.approx(d_losses[0], rel=1e-6)  # the log keeps the first D step's loss
    assert g_loss == pytest.approx(float(generator_loss.detach()), rel=1e-5)
    # D's parameters (its running statistics also count the generator loss's forward pass here) and all of G
    for mine, reference in ((dict(control.D.named_parameters()), dict(by_hand.D.named_parameters())),
                            (control.G.state_dict(), by_hand.G.state_dict())):
        for name, value in mine.items():
            torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert float(control.d_opt.state_dict()["state"][0]["step"]) == 6  # two iterations of three D steps


def run_steps(cfg: it.GANConfig, n: int = 3) -> it.GANTrainer:
    trainer = it.GANTrainer(tiny_gan(), cfg)
    for _ in range(n):
        trainer.train_step()
    return trainer


@pytest.mark.parametrize("alpha, K", [(0.0, 0), (1.0, 1)])
def test_alpha_zero_and_one_are_the_plain_and_the_one_step_unrolled_runs(alpha: float, K: int) -> None:
    extrapolated = run_steps(it.GANConfig(K=1, alpha=alpha, batch=6, steps=3))
    reference = run_steps(it.GANConfig(K=K, batch=6, steps=3))
    for name, value in extrapolated.G.state_dict().items():
        torch.testing.assert_close(value, reference.G.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
    # and alpha does change the gradient: alpha = 5 moves G elsewhere than K = 1
    far = run_steps(it.GANConfig(K=1, alpha=5.0, batch=6, steps=3))
    assert not all(torch.allclose(p, q) for p, q in zip(far.G.parameters(), reference.G.parameters()))


@pytest.mark.parametrize("fields, message", [
    ({"d_steps": 0}, "d_steps must be >= 1"),
    ({"alpha": 5.0, "K": 0}, "needs K = 1"),
    ({"alpha": 5.0, "K": 3}, "needs K = 1"),
    ({"alpha": float("inf"), "K": 1}, "alpha must be a finite number"),
])
def test_bad_control_settings_are_refused(fields: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        it.GANConfig(**fields).validate()


# ----------------------------------------------------------------------------------------- rows and files

SETTINGS = {"K": [0, 5], "controls": [6, 16], "alphas": [5.0], "seeds": [0, 1]}


def test_rows_folders_and_labels() -> None:
    rows = ex.setting_rows(SETTINGS)
    assert rows == [{"K": 0}, {"K": 5}, {"K": 0, "d_steps": 6}, {"K": 0, "d_steps": 16}, {"K": 1, "alpha": 5.0}]
    assert [ex.row_label(r) for r in rows] == ["K = 0", "K = 5", "6 D steps", "16 D steps", "α = 5 (K = 1)"]
    assert [ex.row_of(r) for r in rows] == [(0, 1, None), (5, 1, None), (0, 6, None), (0, 16, None), (1, 1, 5.0)]
    assert ex.setting_rows({"K": [0, 5]}) == [{"K": 0}, {"K": 5}]  # files without controls
    folders = [it.RunSpec(tiny_gan(), it.GANConfig(), {"X": "1/4", **r}).folder for r in rows]
    assert folders[:2] == ["X1_4-K0-seed0", "X1_4-K5-seed0"]  # the K rows keep their folders
    assert len(set(folders)) == len(folders)


def entry(seed: int, modes: int, kl: float, **row: Any) -> Dict[str, Any]:
    return {"run": f"{row}-{seed}", "X": "1/4", **row, "seed": seed, "status": "done", "step": 10,
            "modes": modes, "kl": kl}


def payload(runs: List[Dict[str, Any]], summary: Any = None) -> Dict[str, Any]:
    settings = {**SETTINGS, "sizes": ["1/4"], "steps": 10, "out": "runs/x"}
    out = {"experiment": "stacked_mnist", "command": "python examples/gan/stacked_mnist.py --controls 6 16",
           "settings": settings, "runs": runs}
    if summary is not None:
        out["summary"] = summary
    return out


# Modes and KL by seed (0, 1) for each row; the page's paired differences are worked out by hand below.
NUMBERS = {
    (("K", 0),): [(5, 6.5), (7, 6.3)],
    (("K", 5),): [(100, 4.0), (140, 3.5)],
    (("K", 0), ("d_steps", 6)): [(90, 4.2), (150, 3.9)],
    (("K", 0), ("d_steps", 16)): [(120, 3.0), (100, 3.6)],
    (("K", 1), ("alpha", 5.0)): [(60, 5.0), (80, 4.5)],
}
COSTS = {"K = 0": 0.05, "K = 5": 0.18, "6 D steps": 0.09, "16 D steps": 0.17, "α = 5 (K = 1)": 0.08}


def full_payload() -> Dict[str, Any]:
    runs = [entry(seed, *numbers[seed], **dict(row)) for row, numbers in NUMBERS.items() for seed in (0, 1)]
    summary = {"seconds_per_iteration": {"1/4": dict(COSTS)}, "timing_rounds": 10, "timing_iterations": 3}
    return copy.deepcopy(payload(runs, summary))  # the damage tests change it


def test_runs_of_keeps_a_k_row_apart_from_its_controls() -> None:
    data = full_payload()
    assert {s: r["modes"] for s, r in ex.runs_of(data, X="1/4", K=0).items()} == {0: 5, 1: 7}
    assert {s: r["modes"] for s, r in ex.runs_of(data, X="1/4", K=0, d_steps=16).items()} == {0: 120, 1: 100}
    assert {s: r["modes"] for s, r in ex.runs_of(data, X="1/4", K=1, alpha=5.0).items()} == {0: 60, 1: 80}
    assert ex.per_seed_problem(data, stacked_mnist.PAGE) is None


@pytest.mark.parametrize("damage, message", [
    (lambda p: p["runs"][4].update(d_steps=7), "is in no row"),
    (lambda p: p["runs"][8].update(alpha=2.0), "is in no row"),
    (lambda p: p["runs"].append(dict(p["runs"][5])), "repeats the run"),
    (lambda p: p["runs"][4].update(d_steps="6"), "d_steps must be integers"),
    (lambda p: p["settings"].update(controls=[6, 6]), "settings.controls must be distinct"),
    (lambda p: p["summary"]["seconds_per_iteration"]["1/4"].update({"K = 0": -1.0}), "positive number"),
    (lambda p: p["summary"].update(timing_rounds=0), "timing_rounds must be a positive integer"),
])
def test_damaged_control_files_are_refused(damage: Any, message: str) -> None:
    data = full_payload()
    damage(data)
    problem = ex.per_seed_problem(data, stacked_mnist.PAGE)
    assert problem is not None and message in problem


def test_page_compares_each_look_ahead_row_with_its_step_and_cost_matched_controls(tmp_path: Path) -> None:
    lines = "\n".join(stacked_mnist.page_body(full_payload(), tmp_path / "page.md"))
    # the cost column: seconds and the ratio to K = 0
    assert "| 1/4 | K = 5 | 120 ± 20 | 3.75 ± 0.25 | 0.180 s (3.6×) |" in lines
    assert "| 1/4 | 16 D steps | 110 ± 10 | 3.30 ± 0.30 | 0.170 s (3.4×) |" in lines
    assert "| 1/4 | 16 D steps | 120 (3.00) | 100 (3.60) |" in lines  # per seed: modes (KL)
    # K = 5 against 6 D steps (step-matched): modes +10, -10 -> 0 ± 10, 1 of 2 ahead; KL -0.2, -0.4
    assert "| 1/4 | K = 5 | 6 D steps, step-matched | 2 | 0 ± 10 | 1 of 2 | -0.30 ± 0.10 |" in lines  # not 0.100
    # K = 5 against 16 D steps (closest cost, 0.18 / 0.17): modes -20, +40; KL +1.0, -0.1
    assert "| 1/4 | K = 5 | 16 D steps, cost-matched (1.06× its cost) | 2 | 10 ± 30 | 1 of 2 | 0.45 ± 0.55 |" \
        in lines
    # alpha = 5 has no step-matched control here (2 D steps); its cost is closest to 6 D steps': -30, -70
    assert "| 1/4 | α = 5 (K = 1) | 6 D steps, cost-matched (0.89× its cost) | 2 | -50 ± 20 | 0 of 2 |" in lines
    assert "α = 5 (K = 1) | 6 D steps, step-matched" not in lines
    json.dumps(full_payload())  # the file is plain JSON


# ----------------------------------------------------------------------------------------------- the costs


def test_matched_count_solves_the_cost_line() -> None:
    costs = {1: 0.05 + 0.01, 11: 0.05 + 0.11, 21: 0.05 + 0.21}
    assert timing.matched_count(costs, 0.05 + 0.16) == 16
    assert timing.matched_count(costs, 0.0) == 1  # never below one step
    with pytest.raises(ValueError, match="at least two"):
        timing.matched_count({1: 0.1}, 0.2)
    with pytest.raises(ValueError, match="does not grow"):
        timing.matched_count({1: 0.2, 11: 0.1}, 0.15)


def test_interleaved_seconds_times_every_step_in_every_round() -> None:
    calls: List[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    seconds = timing.interleaved_seconds(steps, iterations=2, rounds=3, warmup=1)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then the rounds interleaved


@pytest.mark.parametrize("argv, message", [
    (["--controls", "1"], "argument --controls: a control commits >= 2 D steps"),
    (["--alphas", "inf"], "must be finite"),
    (["--K", "0", "--match-cost"], "give --K > 0 or --alphas"),
    (["--K", "5", "--match-cost", "--match-candidates", "3", "3"], "two distinct counts"),
    (["--controls", "6", "6"], "must be distinct"),
])
def test_bad_control_flags_are_refused_before_any_work(argv: List[str], message: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        stacked_mnist.parse_args(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- the script

TINY = ["--steps", "2", "--batch", "4", "--seeds", "0", "1", "--sizes", "1/4", "--eval-samples", "40",
        "--snapshot-every", "1", "--checkpoint-every", "1", "--no-progress", "--workers", "1",
        "--classifier-train", "300", "--classifier-epochs", "1", "--timing-rounds", "1", "--timing-iterations", "1"]


@needs_real_mnist
def test_match_cost_then_the_controls_end_to_end(tmp_path: Path) -> None:
    cache = ["--classifier-cache", str(tmp_path / "clf.pt")]
    match = tmp_path / "match"
    assert stacked_mnist.main(TINY + cache + ["--K", "2", "--alphas", "3", "--match-cost", "--match-candidates",
                                              "1", "4", "--out", str(match)]) == 0
    matched = json.loads((match / stacked_mnist.COST_MATCH_FILE).read_text())["sizes"]["1/4"]
    assert set(matched["rows"]) == {"K = 2", "α = 3 (K = 1)"} and set(matched["candidates"]) == {"1", "4"}
    assert all(row["matched_d_steps"] >= 1 and row["ratio"] > 0 for row in matched["rows"].values())
    assert not any((match / name).exists() for name in ("results.json", "X1_4-K2-seed0"))  # nothing trained

    out, page = tmp_path / "out", tmp_path / "page.md"
    assert stacked_mnist.main(TINY + cache + ["--K", "0", "2", "--controls", "3", "--alphas", "3", "--out", str(out),
                                              "--doc", str(page)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["run"] for r in results["runs"]) == sorted(
        f"X1_4-{row}-seed{s}" for row in ("K0", "K2", "K0-d_steps3", "K1-alpha3.0") for s in (0, 1))
    per_seed = json.loads((tmp_path / "page" / "per_seed.json").read_text())
    assert set(per_seed["summary"]["seconds_per_iteration"]["1/4"]) == {"K = 0", "K = 2", "3 D steps",
                                                                        "α = 3 (K = 1)"}
    text = page.read_text()
    assert "| 1/4 | K = 2 | 3 D steps, step-matched | 2 |" in text and "cost per iteration (× K = 0)" in text
    assert any("rows the paper does not have" in line for line in results["deviations"])


def test_the_committed_controls_page_is_remade_byte_identically(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    committed, copy_dir = REPO_ROOT / "docs" / "results", tmp_path / "docs" / "results"
    copy_dir.mkdir(parents=True)
    shutil.copyfile(committed / "stacked_mnist_controls.md", copy_dir / "stacked_mnist_controls.md")
    shutil.copytree(committed / "stacked_mnist_controls", copy_dir / "stacked_mnist_controls")
    monkeypatch.chdir(tmp_path)
    page = Path("docs/results/stacked_mnist_controls.md")
    assert stacked_mnist.main(["--report-only", "--doc", str(page)]) == 0
    assert page.read_bytes() == (committed / "stacked_mnist_controls.md").read_bytes()
    # its table is the per-seed numbers' (K = 10 at X = 1/4 against its cost-matched control, seed by seed)
    per_seed = json.loads((committed / "stacked_mnist_controls" / "per_seed.json").read_text())
    k10 = {r["seed"]: r["modes"] for r in per_seed["runs"] if (r["X"], r["K"], r.get("d_steps")) == ("1/4", 10, None)}
    c36 = {r["seed"]: r["modes"] for r in per_seed["runs"] if (r["X"], r.get("d_steps")) == ("1/4", 36)}
    differences = [k10[s] - c36[s] for s in range(5)]
    mean, se = statistics.fmean(differences), statistics.stdev(differences) / math.sqrt(5)
    row = next(line for line in page.read_text().splitlines() if line.startswith("| 1/4 | K = 10 | 36 D steps"))
    assert f"| {mean:.0f} ± {se:.0f} | {sum(d > 0 for d in differences)} of 5 |" in row
