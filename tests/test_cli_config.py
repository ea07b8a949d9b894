"""Configurations from one source (examples/unroll_examples/cli.py): flags made from a dataclass's fields, and the
configuration built back from the parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest

import extrapolation
import fig2
import historical_averaging
import mixture
import second_gradient
import sweep_mixture
import symmetric_recursive
from unroll_examples import ablations, cli
from unroll_examples.sweeps import Cell
from unroll_examples.training import TrainConfig


@dataclass(frozen=True)
class Toy:
    name: str = cli.option("a", "which one", choices=("a", "b"))
    count: int = cli.option(3, "how many (100% of them)", type=cli.positive_int)
    rate: Optional[float] = cli.option(None, "a rate (default: none)", type=cli.learning_rate)
    step_scale: float = cli.option(1.5, "a plain float from the annotation")
    fast: bool = cli.option(False, "a switch, off unless given")
    checked: bool = cli.option(True, "a switch, on unless turned off")


@dataclass(frozen=True)
class NoHelp:
    size: int = 1


def parser_for(defaults: Any, **kwargs: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    cli.add_config_flags(p, defaults, **kwargs)
    return p


def refusal(p: argparse.ArgumentParser, argv: List[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_flags_take_name_default_type_and_choices_from_the_fields() -> None:
    p = parser_for(Toy())
    actions = {a.dest: a for a in p._actions if a.dest != "help"}
    assert {d: a.option_strings for d, a in actions.items()} == {
        "name": ["--name"], "count": ["--count"], "rate": ["--rate"], "step_scale": ["--step-scale"],
        "fast": ["--fast"], "checked": ["--checked", "--no-checked"]}
    assert {d: a.default for d, a in actions.items()} == dataclasses.asdict(Toy())
    assert actions["count"].type is cli.positive_int and actions["rate"].type is cli.learning_rate
    assert actions["step_scale"].type is float and actions["name"].choices == ("a", "b")
    assert cli.config_from_args(p.parse_args([]), Toy()) == Toy()
    args = p.parse_args(["--name", "b", "--count", "7", "--rate", "0.25", "--step-scale", "-2", "--fast",
                         "--no-checked"])
    assert cli.config_from_args(args, Toy()) == Toy(name="b", count=7, rate=0.25, step_scale=-2.0, fast=True,
                                                    checked=False)


def test_defaults_come_from_the_instance_given_not_the_class() -> None:
    preset = Toy(count=9, fast=True)
    p = parser_for(preset)
    assert cli.config_from_args(p.parse_args([]), preset) == preset
    # A switch on in the preset can be turned off.
    assert cli.config_from_args(p.parse_args(["--no-fast"]), preset) == Toy(count=9, fast=False)


def test_validators_and_choices_from_metadata_refuse_bad_values(capsys: pytest.CaptureFixture) -> None:
    p = parser_for(Toy())
    assert "argument --count: must be >= 1, got 0" in refusal(p, ["--count", "0"], capsys)
    assert "argument --rate: learning rates must be > 0 and finite, got inf" in refusal(p, ["--rate", "inf"], capsys)
    assert "argument --name: invalid choice: 'c'" in refusal(p, ["--name", "c"], capsys)
    assert "argument --step-scale: invalid float value: 'x'" in refusal(p, ["--step-scale", "x"], capsys)


def test_help_shows_every_default_and_survives_percent_signs() -> None:
    text = " ".join(parser_for(Toy()).format_help().split())
    assert "which one (default: a)" in text and "how many (100% of them) (default: 3)" in text
    assert "a rate (default: none)" in text and "(default: None)" not in text
    assert "a plain float from the annotation (default: 1.5)" in text
    assert "a switch, on unless turned off (default: True)" in text


def test_only_exclude_and_help_overrides() -> None:
    p = parser_for(Toy(), only=("count", "fast"), helps={"count": "steps of this script"})
    assert sorted(a.dest for a in p._actions if a.dest != "help") == ["count", "fast"]
    assert "steps of this script" in p.format_help()
    args = p.parse_args(["--count", "4"])
    assert cli.config_from_args(args, Toy(step_scale=8.0)) == Toy(count=4, step_scale=8.0)  # the rest: the base
    p = parser_for(Toy(), exclude=("rate", "checked"))
    assert sorted(a.dest for a in p._actions if a.dest != "help") == ["count", "fast", "name", "step_scale"]


def test_mistakes_in_the_declaration_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"NoHelp.size has no help text"):
        parser_for(NoHelp())
    with pytest.raises(ValueError, match=r"Toy has no field\(s\) colour, speed"):
        parser_for(Toy(), only=("count", "colour"), exclude=("speed",))
    with pytest.raises(TypeError, match="dataclass instance"):
        parser_for(Toy)


def test_presets_leave_disagreeing_defaults_to_the_chosen_preset() -> None:
    presets = {"small": Toy(count=2), "large": Toy(count=20, step_scale=3.0)}
    p = parser_for(presets["small"], presets=presets)
    text = " ".join(p.format_help().split())
    assert "how many (100% of them) (default by preset: small 2, large 20)" in text
    assert "which one (default: a)" in text  # the presets agree: an ordinary default
    for preset in presets.values():
        assert cli.config_from_args(p.parse_args([]), preset) == preset
        assert cli.config_from_args(p.parse_args(["--count", "5"]), preset) == dataclasses.replace(preset, count=5)
    assert cli.changed_fields(presets["large"], presets["small"]) == {"count": 20, "step_scale": 3.0}


def _other_value(field: dataclasses.Field[Any], value: Any) -> Any:
    """A valid value of a TrainConfig field other than its default ``value``."""
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if value is None:
        return 0.003
    if isinstance(value, float):
        return value / 2 if value else 0.25
    return value + 3


def test_mixture_turns_every_trainconfig_field_into_its_flag_and_back() -> None:
    """Each field alone, set on the command line to a value other than its default, is that field of the
    configuration ``mixture.parse_args`` builds, the others at TrainConfig's defaults."""
    assert mixture.TRAINING == TrainConfig()
    parser = mixture.build_parser()
    by_dest: Dict[str, argparse.Action] = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), field.name)
        action = by_dest[field.name]
        assert action.option_strings[0] == "--" + field.name.replace("_", "-") and action.default == default
        if field.name in ("stop_grad", "average_over_steps"):  # valid only beside an unrolled K
            continue
        value = _other_value(field, default)
        argv = [action.option_strings[0]] if isinstance(value, bool) else [action.option_strings[0], str(value)]
        _, cfg, _, _ = mixture.parse_args(argv + ["--out", "unused"])
        assert cfg == dataclasses.replace(TrainConfig(), **{field.name: value}), field.name
    _, cfg, _, _ = mixture.parse_args(["--K", "2", "--stop-grad", "--average-over-steps", "--out", "unused"])
    assert cfg == TrainConfig(K=2, stop_grad=True, average_over_steps=True)


def test_mixture_help_shows_the_default_of_every_flag_that_has_a_value() -> None:
    parser = mixture.build_parser()
    formatter = parser._get_formatter()
    by_dest = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), field.name)
        if isinstance(default, bool):  # switches: off unless given
            continue
        shown = "--d-lr" if default is None else default  # unroll_lr falls back to --d-lr
        assert f"(default: {shown})" in formatter._expand_help(by_dest[field.name]), field.name


@pytest.mark.parametrize("flags, expected", [
    ([], TrainConfig(d_lr=1e-3, g_lr=1e-3, unroll_lr=1e-3, K=5, steps=2000, eval_every=250)),
    (["--paper"], TrainConfig(d_lr=1e-4, g_lr=1e-4, unroll_lr=1e-4, K=10, steps=10_000, eval_every=250)),
    (["--paper", "--K", "3", "--steps", "7", "--dataset", "grid", "--eval-every", "5"],
     TrainConfig(dataset="grid", d_lr=1e-4, g_lr=1e-4, unroll_lr=1e-4, K=3, steps=7, eval_every=5)),
    (["--K", "2", "--no-control"], TrainConfig(d_lr=1e-3, g_lr=1e-3, unroll_lr=1e-3, K=2, steps=2000,
                                               eval_every=250)),
])
def test_fig2_presets_and_flags_give_its_three_configurations(flags: List[str], expected: TrainConfig) -> None:
    """The unrolled GAN is the chosen preset with the flags applied; K = 0 and the control differ from it in
    K or control alone (the settings written out before the configuration came from one source)."""
    _, cells = fig2.parse_args(flags + ["--workers", "1"])
    configs = [cell.cfg for cell in cells]
    others = [dataclasses.replace(expected, K=0)]
    if "--no-control" not in flags:
        others.append(dataclasses.replace(expected, control=True))
    assert configs == [expected] + others


def test_fig2_refuses_a_preset_k_override_below_one(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        fig2.parse_args(["--paper", "--K", "0"])
    assert "--K must be >= 1 (the unrolled GAN" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["mixture", "fig2"])
def test_an_empty_output_folder_is_refused(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--out ""`` would write into the current folder: refused before any work, naming the flag."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.build_parser().parse_args(["--out", ""])
    assert "argument --out: must name a folder, got an empty string" in capsys.readouterr().err


def test_config_from_args_takes_only_the_fields_named() -> None:
    """A script's own flag that shares a field's name (extrapolation.py's ``--control``, a list of controls) is
    not that field when ``only`` names the flags made from the configuration."""
    p = parser_for(Toy(), only=("count",))
    p.add_argument("--name", nargs="+", default=["x", "y"])
    args = p.parse_args(["--count", "7", "--name", "p", "q"])
    assert cli.config_from_args(args, Toy(), only=("count",)) == Toy(count=7)
    assert cli.config_from_args(args, Toy()) == Toy(count=7, name=("p", "q"))  # without only, the list is taken
    with pytest.raises(ValueError, match="Toy has no field"):
        cli.config_from_args(args, Toy(), only=("size",))


ABLATIONS = {  # script, the flags that keep its sweep small, its --steps default before the flags came from TrainConfig
    "second_gradient": (second_gradient, ["--ks", "0", "2", "--regimes", "1"], 2000),
    "historical_averaging": (historical_averaging, ["--sizes", "1", "--periods", "2", "--unrolled-ks", "1"], 3000),
    "extrapolation": (extrapolation, ["--ks", "0", "1", "--alphas", "2", "--control", "1"], 2000),
    "symmetric_recursive": (symmetric_recursive, ["--ks", "2"], 2000),
}
# The ablations' shared settings as they were written out by hand (ablations.py) before they came from TrainConfig.
ABLATION_DEFAULTS = dict(dataset="ring", d_lr=1e-3, g_lr=1e-3, unroll_lr=1e-3, eval_every=250, eval_samples=10_000)
CHANGED = ["--dataset", "grid", "--steps", "7", "--d-lr", "0.002", "--g-lr", "0.003", "--unroll-lr", "0.004",
           "--eval-every", "3", "--eval-samples", "300"]
CHANGED_CONFIG = dict(dataset="grid", steps=7, d_lr=0.002, g_lr=0.003, unroll_lr=0.004, eval_every=3,
                      eval_samples=300)


def _shared(cell: Cell) -> TrainConfig:
    """A cell's configuration less what the sweeps vary from cell to cell."""
    return dataclasses.replace(cell.cfg, K=0, control=False, stop_grad=False, average_over_steps=False)


@pytest.mark.parametrize("changed", [False, True], ids=["defaults", "every-flag-changed"])
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_cells_share_the_common_flags(name: str, changed: bool) -> None:
    """Every cell of an ablation sweep has the dataset, steps, learning rates and evaluation settings of its flags
    (their defaults: the values written out before), and nothing else of the shared settings changes."""
    module, small, steps = ABLATIONS[name]
    argv = small + (CHANGED if changed else [])
    extra = {"loss": "nonsaturating"} if name == "historical_averaging" else {}
    if extra and changed:
        argv += ["--loss", "nonsaturating"]
    expected = TrainConfig(**CHANGED_CONFIG, **(extra if changed else {})) if changed else \
        TrainConfig(**ABLATION_DEFAULTS, steps=steps)
    _, cells = ablations.parse_and_check(module.build_parser(), module.build_cells, argv)
    assert cells and all(_shared(cell) == expected for cell in cells), name
    assert cells[0].cfg.K == 0 and not cells[0].cfg.control  # the plain GAN's cost reference


def test_extrapolation_control_flag_is_the_list_of_controls_not_the_field() -> None:
    _, cells = ablations.parse_and_check(extrapolation.build_parser(), extrapolation.build_cells,
                                         ["--ks", "0", "1", "--alphas", "2", "--control", "1", "3"])
    assert [(c.cfg.K, c.cfg.control) for c in cells] == [(0, False), (1, False), (1, False), (1, True), (3, True)]


def test_historical_averaging_loss_flag_is_the_field() -> None:
    _, cells = ablations.parse_and_check(historical_averaging.build_parser(), historical_averaging.build_cells,
                                         ["--sizes", "1", "--periods", "2", "--unrolled-ks", "1", "--loss",
                                          "nonsaturating"])
    assert {c.cfg.loss for c in cells} == {"nonsaturating"}


@pytest.mark.parametrize("quick", [False, True])
def test_sweep_mixture_cells_are_the_flags_settings(quick: bool) -> None:
    """Main cells: the flags' settings per dataset, activation and mode weights (the grid with --steps-grid);
    sensitivity cells: the ring with --sens-steps and one factor changed, written out here as before."""
    argv = ["--datasets", "ring", "grid", "--activations", "tanh", "--weight-stds", "0", "0.1", "--ks", "0", "3",
            "--control-ks", "2", "--steps", "9", "--steps-grid", "11", "--sens-steps", "5", "--d-lr", "0.002",
            "--g-lr", "0.003", "--unroll-lr", "0.004", "--eval-every", "3", "--eval-samples", "300", "--batch", "16"]
    args = sweep_mixture.build_parser().parse_args(argv + (["--quick"] if quick else []))
    cells = sweep_mixture.build_cells(args)
    shared = dict(d_lr=0.002, g_lr=0.003, unroll_lr=0.004, eval_every=3, eval_samples=300, batch=16)
    main = [TrainConfig(dataset=dataset, activation="tanh", weight_std=std, steps=11 if dataset == "grid" else 9,
                        K=K, control=control, **shared)
            for dataset in ("ring", "grid") for std in (0.0, 0.1) for K, control in ((0, False), (3, False), (2, True))]
    ring = dict(shared, dataset="ring", steps=5)
    sensitivity = [dataclasses.replace(TrainConfig(**ring, K=10), unroll_lr=1e-4)]  # App. A as written
    if not quick:
        sensitivity += [dataclasses.replace(TrainConfig(**ring, K=K), **change) for change, ks in [
            (dict(g_lr=1e-3), (0, 10)), (dict(g_lr=1e-3, unroll_lr=1e-4), (10,)), (dict(activation="tanh"), (0, 10)),
            (dict(activation="tanh", g_lr=1e-3), (0,)), (dict(loss="nonsaturating"), (0, 10)),
            (dict(stop_grad=True), (10,))] for K in ks]
    assert [c.cfg for c in cells if c.group == "main"] == main
    assert [c.cfg for c in cells if c.group == "sensitivity"] == sensitivity


def test_sweep_mixture_defaults_are_app_a_with_its_look_ahead_rate() -> None:
    args = sweep_mixture.build_parser().parse_args(["--datasets", "ring", "--ks", "0", "--control-ks", "1",
                                                    "--no-sensitivity"])
    assert [c.cfg for c in sweep_mixture.build_cells(args)] == [
        TrainConfig(unroll_lr=1e-3, eval_every=250, steps=2000, K=0),
        TrainConfig(unroll_lr=1e-3, eval_every=250, steps=2000, K=1, control=True)]
