"""The discriminator's init (``TrainConfig.d_init``), its accuracy and loss at each evaluation, the control-strength
sweep (examples/gan/control_strength.py) and the cost-matched control of examples/gan/extrapolation.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import control_strength as cs
import extrapolation as ex
from unroll_examples.models import INIT_GAIN, init_discriminator, init_generator
from unroll_examples.training import TrainConfig, Trainer, index_state, init_state, run_name

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = ["--eval-every", "2", "--eval-samples", "200", "--threads", "1", "--no-progress"]


def small(**kwargs: Any) -> TrainConfig:
    return TrainConfig(**{"batch": 64, "eval_samples": 300, "eval_every": 2, "steps": 4, "d_lr": 1e-3,
                          "g_lr": 1e-3, **kwargs})


def leaves(tree: Any) -> List[torch.Tensor]:
    return [x for v in tree.values() for x in leaves(v)] if isinstance(tree, dict) else [tree]


# ---- d_init ----
def test_default_d_init_is_the_orthogonal_init_of_before() -> None:
    """The default keeps every earlier run's numbers: D's weights are G's orthogonal gain-0.8 init, drawn right
    after G's from the seed's init stream, with zero biases (rebuilt here from torch.nn.init directly)."""
    seed = 3
    gen = torch.Generator().manual_seed(seed * 16)  # the init stream of seed 3 (training._STREAMS = 16)
    init_generator(gen)
    expected = {}
    for i, (fan_in, fan_out) in enumerate(((2, 128), (128, 1))):
        weight = torch.empty(fan_out, fan_in)
        torch.nn.init.orthogonal_(weight, gain=INIT_GAIN, generator=gen)
        expected[f"w{i}"], expected[f"b{i}"] = weight.t(), torch.zeros(fan_out)
    d = init_state(TrainConfig(), seed)["d"]
    assert TrainConfig().d_init == "orthogonal" and d.keys() == expected.keys()
    for name in expected:
        assert torch.equal(d[name], expected[name]), name
    assert run_name(TrainConfig()) == "ring_K0_ulr0.0001_glr0.0001_relu_sat"  # earlier runs' folders keep their names


def test_pytorch_d_init_is_torch_nn_linear_init() -> None:
    """``d_init="pytorch"``: draw for draw the init of torch.nn.Linear(2, 128) then Linear(128, 1) (same seed), so
    weights and biases are uniform in ±1/√fan_in; G's init is unchanged, and the folder names the init."""
    torch.manual_seed(11)
    layers = [torch.nn.Linear(2, 128), torch.nn.Linear(128, 1)]
    d = init_discriminator(torch.Generator().manual_seed(11), init="pytorch")
    for i, layer in enumerate(layers):
        assert torch.equal(d[f"w{i}"], layer.weight.detach().t()) and torch.equal(d[f"b{i}"], layer.bias.detach())
        bound = 1 / math.sqrt(layer.in_features)
        assert d[f"w{i}"].abs().max() <= bound and d[f"b{i}"].abs().max() <= bound
    # 128 weights uniform in ±1/√2: their spread is that of a uniform law (std bound/√3), not of the orthogonal init
    assert abs(float(d["w0"].std()) - 1 / math.sqrt(2) / math.sqrt(3)) < 0.08
    orthogonal, pytorch = init_state(TrainConfig(), 5), init_state(TrainConfig(d_init="pytorch"), 5)
    for a, b in zip(leaves(orthogonal["g"]), leaves(pytorch["g"]), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(orthogonal["d"]["w0"], pytorch["d"]["w0"])
    assert run_name(TrainConfig(d_init="pytorch")).endswith("_dpytorch")
    with pytest.raises(ValueError, match="d_init"):
        TrainConfig(d_init="xavier").validate()


# ---- D's accuracy and loss at each evaluation ----
def test_d_accuracy_and_loss_match_an_independent_computation() -> None:
    """At every evaluation, in float64 by hand: D(x) = sigmoid((x / 4) W0 + b0 -> relu -> W1 + b1); accuracy =
    (share of reference points with D > 1/2 + share of samples with D < 1/2) / 2; L_D = −mean log D(x) − mean
    log(1 − D(G(z)))."""
    trainer = Trainer(small(steps=2), [0, 1])
    trainer.run()
    for i, seed in enumerate(trainer.seeds):
        d = {k: v.double() for k, v in index_state(trainer.state["d"], i).items()}
        samples = trainer.generator_samples(i).double()
        real = trainer.reference[:len(samples)].double()
        prob = {name: torch.sigmoid(torch.relu(0.25 * x @ d["w0"] + d["b0"]) @ d["w1"] + d["b1"]).squeeze(-1)
                for name, x in (("real", real), ("fake", samples))}
        accuracy = 0.5 * float((prob["real"] > 0.5).double().mean() + (prob["fake"] < 0.5).double().mean())
        loss = float(-prob["real"].log().mean() - (1 - prob["fake"]).log().mean())
        record = [r for r in trainer.records if r["seed"] == seed and r["step"] == 2][0]
        assert record["d_accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert record["d_loss_eval"] == pytest.approx(loss, rel=1e-5)
        assert 0 <= record["d_accuracy"] <= 1 and record["d_loss_eval"] > 0


def test_evaluations_do_not_change_training() -> None:
    """Evaluating (D's numbers included) draws nothing from the training streams: evaluating at every iteration
    or only at the end gives the same parameters, bit for bit, and the same final metrics."""
    often, rarely = Trainer(small(steps=4, eval_every=1), [0, 1]), Trainer(small(steps=4, eval_every=4), [0, 1])
    often.run()
    rarely.run()
    for a, b in zip(leaves(often.state), leaves(rarely.state), strict=True):
        assert torch.equal(a, b)
    assert often.records[-2:] == rarely.records[-2:]


# ---- the control-strength sweep ----
def test_control_strength_sweep_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "control_strength.md"
    argv = TINY + ["--seeds", "0-1", "--steps", "4", "--d-steps", "2", "3", "--out", str(tmp_path / "runs"),
                   "--doc", str(doc)]
    assert cs.main(argv) == 0
    page = doc.read_text()
    assert page.splitlines()[2].startswith("**In brief** (ring, 2 paired seeds, 4 iterations")
    for label in ("2 D steps, orthogonal init", "3 D steps, orthogonal init", "2 D steps, pytorch init",
                  "3 D steps, pytorch init"):
        assert f"| {label} | 4 |" in page
    traces = json.loads((tmp_path / "control_strength" / "traces.json").read_text())
    folders = {row["label"]: row["folder"] for row in
               json.loads((tmp_path / "control_strength" / "per_seed.json").read_text())["rows"]}
    assert folders["2 D steps, pytorch init"].endswith("control1_ulr0.001_glr0.001_relu_sat_dlr0.001_dpytorch_s2_n4")
    # The page's D-accuracy column at iteration 4 is the mean over seeds of the records' values.
    records = traces["3 D steps, pytorch init"]
    final = [r["d_accuracy"] for r in records if r["step"] == 4]
    assert len(final) == 2
    table = page[page.index("**D accuracy** (0.5 = chance):"):]
    row = [line for line in table.splitlines() if line.startswith("| 3 D steps, pytorch init |")][0]
    assert row.rstrip(" |").endswith(f"{sum(final) / 2:.2f}")


def test_control_strength_refuses_one_d_step(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cs.main(TINY + ["--d-steps", "1", "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "p.md")])
    assert "argument --d-steps: a control commits >= 2 D steps" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---- extrapolation.py: cost matching and the paired comparison ----
def test_match_cost_names_the_control_closest_in_measured_cost(tmp_path: Path) -> None:
    argv = TINY + ["--match-cost", "--alphas", "3", "--ks", "0", "--seeds", "0-1", "--match-candidates", "2", "4",
                   "--timing-iterations", "1", "--timing-rounds", "1", "--out", str(tmp_path / "runs"),
                   "--doc", str(tmp_path / "x.md")]
    assert ex.main(argv) == 0
    match: Dict[str, Any] = json.loads((tmp_path / "x" / "cost_match.json").read_text())
    assert not (tmp_path / "runs").exists()  # nothing trained
    ratios = {int(n): match["controls"][n] / match["extrapolated_median"] for n in match["controls"]}
    assert ratios == pytest.approx({int(n): r for n, r in match["ratio_to_extrapolated"].items()})
    assert match["closest_d_steps"] == min(ratios, key=lambda n: abs(ratios[n] - 1))


def test_paired_comparison_counts_seeds_by_hand(tmp_path: Path) -> None:
    doc = tmp_path / "e.md"
    argv = TINY + ["--alphas", "3", "--ks", "0", "--control", "1", "--seeds", "0-1", "--steps", "4",
                   "--timing-iterations", "1", "--timing-rounds", "1", "--min-hq", "0",
                   "--out", str(tmp_path / "runs"), "--doc", str(doc)]
    assert ex.main(argv) == 0
    page = doc.read_text()
    assert page.splitlines()[2].startswith("**In brief** (ring, 2 paired seeds, 4 iterations")
    assert "| run | iterations | stable coverage (iteration) | strict modes (lenient) |" in page
    rows = {r["label"]: r for r in json.loads((tmp_path / "e" / "per_seed.json").read_text())["rows"]}
    a, b = rows["extrapolated α=3"], rows["control, 2 D steps"]
    d_hq = [100 * (x - y) for x, y in zip(a["hq"], b["hq"])]
    only_a = sum(x is not None and y is None for x, y in zip(a["stable_coverage"], b["stable_coverage"]))
    line = [x for x in page.splitlines() if x.startswith("| extrapolated α=3 − control, 2 D steps |")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].split(" / ")[0] == str(only_a) and sum(map(int, cells[2].split(" / "))) == 2
    assert cells[5].startswith(f"{sum(d_hq) / 2:.1f}")
