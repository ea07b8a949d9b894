"""The image experiments' configuration from one source (examples/unroll_examples/image_experiment.py ``ImageConfig``):
each migrated script's presets at its top (``CONFIGS``), its flags made from the config's fields, ``--paper``
picking the paper preset, the deviations from the paper computed from the config, and the stored settings that
``--resume`` compares."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

import cifar10
import colored_mnist
import mnist_rnn
import stacked_mnist
from unroll_examples import cli, runs
from unroll_examples import image_experiment as ex

MIGRATED = [stacked_mnist, colored_mnist, cifar10, mnist_rnn]
# Every flag the script had before its settings came from ImageConfig: none may disappear.
FLAGS = {
    stacked_mnist: ["--paper", "--K", "--seeds", "--steps", "--batch", "--d-lr", "--g-lr", "--unroll-lr", "--beta1",
                    "--g-loss", "--snapshot-every", "--checkpoint-every", "--data-dir", "--out", "--resume",
                    "--device", "--threads", "--workers", "--no-progress", "--per-seed", "--sizes",
                    "--eval-samples", "--split", "--classifier-cache", "--classifier-train",
                    "--classifier-epochs"],
    colored_mnist: ["--paper", "--K", "--seeds", "--steps", "--batch", "--d-lr", "--g-lr", "--unroll-lr", "--beta1",
                    "--g-loss", "--snapshot-every", "--checkpoint-every", "--data-dir", "--out", "--resume",
                    "--device", "--threads", "--workers", "--no-progress", "--per-seed", "--sizes",
                    "--eval-samples", "--js-samples", "--split"],
    cifar10: ["--paper", "--K", "--seeds", "--steps", "--batch", "--d-lr", "--g-lr", "--unroll-lr", "--beta1",
              "--g-loss", "--snapshot-every", "--checkpoint-every", "--data-dir", "--out", "--resume", "--device",
              "--threads", "--workers", "--no-progress", "--per-seed", "--size", "--targets", "--restarts",
              "--lbfgs-iters", "--pairs", "--no-checksum"],
    mnist_rnn: ["--paper", "--K", "--seeds", "--steps", "--batch", "--d-lr", "--g-lr", "--unroll-lr", "--beta1",
                "--g-loss", "--snapshot-every", "--checkpoint-every", "--data-dir", "--out", "--resume", "--device",
                "--threads", "--workers", "--no-progress", "--per-seed", "--targets", "--restarts", "--lbfgs-iters",
                "--pairs", "--split"],
}


def parsed(script: Any, argv: List[str]) -> ex.ImageConfig:
    args, config, out = script.parse_args(argv)
    assert out == Path(config.out)
    return config


def error_of(script: Any, argv: List[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        script.parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("script", MIGRATED)
def test_no_flag_disappeared_and_every_setting_is_a_flag(script: Any) -> None:
    options = {s for action in script.build_parser()._actions for s in action.option_strings}
    assert set(FLAGS[script]) <= options
    assert {cli.flag_name(name) for name in script.SETTINGS} <= options
    assert set(script.PAPER_STATES) <= set(script.SETTINGS)
    assert set(script.CONFIGS) == {"reduced", "paper"} and script.CONFIGS["paper"] is script.PAPER


@pytest.mark.parametrize("script", MIGRATED)
def test_presets_are_what_the_flags_give(script: Any, tmp_path: Path) -> None:
    reduced, paper = script.CONFIGS["reduced"], script.CONFIGS["paper"]
    assert parsed(script, []) == reduced
    assert parsed(script, ["--paper"]) == paper
    # an explicit flag overrides either preset; the others keep the preset's values
    out = str(tmp_path / "o")
    got = parsed(script, ["--paper", "--steps", "7", "--seeds", "4", "2", "--out", out])
    assert got == dataclasses.replace(paper, steps=7, seeds=(4, 2), out=out)
    assert parsed(script, ["--d-lr", "0.5"]) == dataclasses.replace(reduced, d_lr=0.5)
    assert parsed(script, ["--d-lr", str(paper.d_lr), "--paper"]).d_lr == paper.d_lr


@pytest.mark.parametrize("script", MIGRATED)
def test_help_names_each_presets_value_where_they_differ(script: Any) -> None:
    reduced, paper = script.CONFIGS["reduced"], script.CONFIGS["paper"]
    helps = {a.dest: a.help or "" for a in script.build_parser()._actions}
    differ = cli.changed_fields(paper, reduced)
    assert differ and set(differ) <= set(script.SETTINGS)
    for name in script.SETTINGS:
        if name in differ:
            assert (f"(default by preset: reduced {cli.as_typed(getattr(reduced, name))}, "
                    f"paper {cli.as_typed(getattr(paper, name))})") in helps[name]
            assert f"{cli.flag_name(name)} {cli.as_typed(getattr(paper, name))}" in helps["paper"]
        else:
            assert "by preset" not in helps[name] and cli.flag_name(name) + " " not in helps["paper"]
    if "K" not in differ:  # several values, shown as typed
        assert helps["K"].endswith(f"(default: {' '.join(map(str, reduced.K))})")


def test_tuple_settings_take_several_values_each_validated(capsys: pytest.CaptureFixture) -> None:
    assert parsed(stacked_mnist, ["--K", "3", "0", "--sizes", "0.5", "1"]).K == (3, 0)
    assert parsed(stacked_mnist, ["--sizes", "0.5", "1"]).sizes == ("1/2", "1")  # size_arg on each value
    assert "argument --seeds: must be in [0, 2**64)" in error_of(stacked_mnist, ["--seeds", "0", "-3"], capsys)
    assert "--K values must be distinct" in error_of(stacked_mnist, ["--K", "1", "1"], capsys)
    assert "--eval-samples must be >= 1, got 0" in error_of(stacked_mnist, ["--eval-samples", "0"], capsys)
    assert "invalid choice: 'hinge'" in error_of(stacked_mnist, ["--g-loss", "hinge"], capsys)
    assert "invalid choice: 'all'" in error_of(stacked_mnist, ["--split", "all"], capsys)
    assert "--js-samples must be >= 10, got 5" in error_of(colored_mnist, ["--js-samples", "5"], capsys)
    assert "--restarts must be >= 1, got 0" in error_of(cifar10, ["--restarts", "0"], capsys)
    assert parsed(cifar10, ["--no-checksum", "--size", "0.5"]) == dataclasses.replace(
        cifar10.CONFIGS["reduced"], no_checksum=True, size="1/2")


@pytest.mark.parametrize("script", MIGRATED)
def test_settings_are_the_fields_in_order_as_json_and_read_back(script: Any) -> None:
    config = script.CONFIGS["reduced"]
    settings = ex.settings_of(config, script.SETTINGS)
    assert list(settings) == list(script.SETTINGS)
    assert settings["K"] == list(config.K) and settings["seeds"] == list(config.seeds)
    back = json.loads(json.dumps(settings))  # as settings.json / results.json hold them
    assert dataclasses.replace(ex.ImageConfig(), **back) == config


def deviation_lines(notes: List[str]) -> Dict[str, str]:
    return {line.split(":")[0]: line for line in notes if "(paper: " in line}


@pytest.mark.parametrize("script", MIGRATED)
def test_deviations_are_the_paper_stated_settings_that_differ(script: Any) -> None:
    reduced, paper, stated = script.CONFIGS["reduced"], script.PAPER, script.PAPER_STATES
    assert deviation_lines(ex.paper_deviations(paper, paper, stated, script.NOTES)) == {}
    lines = deviation_lines(ex.paper_deviations(reduced, paper, stated, script.NOTES))
    differ = [name for name in stated if getattr(reduced, name) != getattr(paper, name)]
    assert list(lines) == differ and "steps" in differ
    assert lines["steps"] == f"steps: {reduced.steps} (paper: {paper.steps})"
    if "seeds" in differ:  # several values, shown as lists
        assert lines["seeds"] == f"seeds: {list(reduced.seeds)} (paper: {list(paper.seeds)})"
    # settings the paper does not state (our snapshot interval) are no deviation; the notes use the config's values
    mine = dataclasses.replace(paper, snapshot_every=3, batch=12)
    notes = ex.paper_deviations(mine, paper, stated, script.NOTES)
    assert deviation_lines(notes) == {}
    assert "batch size: not stated in the paper; 12 here" in notes
    notes = ex.paper_deviations(dataclasses.replace(paper, beta1=0.25), paper, stated, script.NOTES)
    if "beta1" in stated:  # App. C states it for the RNN
        assert deviation_lines(notes) == {"beta1": f"beta1: 0.25 (paper: {paper.beta1})"}
    else:  # a note, with the value in use
        assert deviation_lines(notes) == {} and any(line.startswith("Adam beta1 = 0.25 ") for line in notes)


def session_settings(tmp_path: Path, argv: List[str]) -> Tuple[argparse.Namespace, Dict[str, Any], Path]:
    args, config, out = stacked_mnist.parse_args(argv + ["--out", str(tmp_path / "out")])
    return args, ex.settings_of(config, stacked_mnist.SETTINGS), out


def test_resume_compares_the_stored_settings(tmp_path: Path) -> None:
    """A run's settings.json (JSON lists, any key order) is accepted on --resume with the same config and --steps
    grown; another learning rate, or a settings file missing a setting, is refused naming it."""
    args, settings, out = session_settings(tmp_path, [])
    with ex.session(args, settings, out):
        pass
    stored = json.loads((out / runs.SETTINGS).read_text())
    assert stored == {k: v for k, v in settings.items() if k not in ex.NOT_COMPARED}
    (out / "run").mkdir()
    (out / "run" / runs.CHECKPOINT).write_bytes(b"")  # what --resume needs to find
    runs.write_json(out / runs.SETTINGS, dict(reversed(list(stored.items()))))
    args, settings, out = session_settings(tmp_path, ["--resume", "--steps", str(settings["steps"] + 5)])
    with ex.session(args, settings, out):
        pass
    args, settings, out = session_settings(tmp_path, ["--resume", "--d-lr", "0.5"])
    was = stacked_mnist.CONFIGS["reduced"].d_lr
    with pytest.raises(runs.SettingsMismatch, match=re.escape(f"other settings (d_lr: {was} in the run, 0.5 now)")):
        with ex.session(args, settings, out):
            pass
    del stored["split"]
    runs.write_json(out / runs.SETTINGS, stored)
    args, settings, out = session_settings(tmp_path, ["--resume"])
    with pytest.raises(runs.SettingsMismatch, match=r"split: \(not set\) in the run, auto now"):
        with ex.session(args, settings, out):
            pass


def test_an_empty_output_folder_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--out ""`` would write into the current folder: refused by argparse, naming the flag."""
    with pytest.raises(SystemExit):
        stacked_mnist.build_parser().parse_args(["--out", ""])
    assert "argument --out: must name a folder" in capsys.readouterr().err
