"""Run management (examples/unroll_examples/runs.py) and what every experiment script gets from it: checkpoints that run
no code, kill -9 then --resume equal to an uninterrupted run, one writer per folder, clear errors for corrupt
checkpoints and other settings, divergence named by iteration and seed, bounded --seeds, workers that die with
their parent, --help with every default.

Each failure of issue 12 is a test here; script-level tests use tiny configurations (a few iterations, small
batches) and, where a process must really die, ``subprocess`` and SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch

import cifar10
import colored_mnist
import historical_averaging
import mixture
import mnist_classifier
import mnist_rnn
import second_gradient
import stacked_mnist
import sweep_mixture
from unroll_examples import cli, runs
from unroll_examples import image_training as it
from unroll_examples import mnist_data as md

ROOT = Path(__file__).resolve().parents[1]
GAN = ROOT / "examples" / "gan"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MIX = ["--K", "1", "--unroll-lr", "1e-3", "--seeds", "0-1", "--batch", "32", "--eval-samples", "200",
       "--no-progress", "--threads", "1"]
IMG_ANY_WORKERS = ["--batch", "4", "--seeds", "0", "--snapshot-every", "2", "--checkpoint-every", "1",
                   "--no-progress", "--targets", "3", "--lbfgs-iters", "3", "--pairs", "50", "--no-checksum"]
IMG = IMG_ANY_WORKERS + ["--workers", "1"]
TIMING = {"train_seconds", "seconds_per_iteration", "eval_seconds", "wall_seconds", "environment", "command"}


# ------------------------------------------------------------------------------------------------ helpers


class Evil:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def write_cifar(folder: Path, n: int = 12) -> Path:
    """Tiny CIFAR-10 training batches in the real python format (cifar10.py's data, made up)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        entry = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry, protocol=2))
    return folder


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    return write_cifar(tmp_path / "cifar")


def script(name: str, *args: str, quiet: bool = False) -> subprocess.Popen:
    """``python examples/gan/<name>.py args`` in its own process (this worktree's unroll, one thread); ``quiet``:
    output to /dev/null (worker processes inherit the pipes, which would keep a reader waiting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    pipe = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, str(GAN / f"{name}.py"), *args], env=env, stdout=pipe, stderr=pipe,
                            text=True)


def wait_for(condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not come true")
        time.sleep(0.05)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> List[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def comparable(value: Any) -> Any:
    """A run's outputs without wall times (and with NaN == NaN)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def assert_same_tensors(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("form", ["raw pickle", "torch.save"])
def test_a_crafted_checkpoint_runs_no_code(tmp_path: Path, form: str) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    payload = {"config": {}, "state": Evil(marker)}
    path.write_bytes(pickle.dumps(payload, protocol=2)) if form == "raw pickle" else torch.save(payload, path)
    with pytest.raises(runs.CheckpointError, match="refused without running anything") as error:
        runs.load_checkpoint(path)
    assert str(path) in str(error.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "text", "not a checkpoint"])
def test_a_damaged_checkpoint_is_named_in_a_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "checkpoint.pt"
    runs.save_checkpoint({"step": 3, "state": {"w": torch.ones(4)}}, path)
    data = path.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 4,
               "text": b"hello, not a checkpoint", "not a checkpoint": None}[damage]
    if damaged is None:
        runs.save_checkpoint({"other": torch.zeros(1)}, path)
    else:
        path.write_bytes(damaged)
    with pytest.raises(runs.CheckpointError, match="checkpoint") as error:
        runs.load_checkpoint(path, required=("step", "state"))
    assert str(path) in str(error.value) and "start that run over" in str(error.value)


def test_a_checkpoint_of_another_shape_is_refused_before_training(tmp_path: Path) -> None:
    from unroll_examples.training import TrainConfig, Trainer

    cfg = TrainConfig(batch=32, eval_samples=200, eval_every=2, steps=2)
    Trainer(cfg, [0, 1], out_dir=tmp_path).run()
    ckpt = runs.load_checkpoint(tmp_path / runs.CHECKPOINT)
    ckpt["state"]["g"]["w0"] = ckpt["state"]["g"]["w0"][:, :3]
    runs.save_checkpoint(ckpt, tmp_path / runs.CHECKPOINT)
    with pytest.raises(runs.CheckpointError, match=r"does not fit this run \(state.g.w0 is"):
        Trainer(cfg, [0, 1], out_dir=tmp_path, resume=True)


def test_atomic_writes_leave_no_temporary_and_use_a_name_of_their_own(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    names: List[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(Path(a).name), real_replace(a, b)))
    runs.atomic_write_bytes(tmp_path / "x.json", b"1")
    runs.atomic_write_bytes(tmp_path / "x.json", b"2")
    assert (tmp_path / "x.json").read_bytes() == b"2" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    assert len(set(names)) == 2 and all(str(os.getpid()) in name for name in names)  # never a fixed name


def test_metrics_json_is_strict_json(tmp_path: Path) -> None:
    runs.write_json(tmp_path / "m.json", {"a": math.nan, "b": [math.inf, 1.5, -math.inf], "c": (1, 2)})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": None, "b": [None, 1.5, None], "c": [1, 2]} and "NaN" not in text


# ------------------------------------------------------------------------------------------- settings


def test_setting_differences_name_every_setting_but_those_that_may_change() -> None:
    saved = {"K": 0, "targets": 64, "steps": 100, "seeds": [0, 1]}
    now = {"K": 3, "targets": 64, "steps": 200, "seeds": (0, 1), "pairs": 50}
    assert runs.setting_differences(saved, now, may_change=("steps",)) == [
        "K: 0 in the run, 3 now", "pairs: (not set) in the run, 50 now"]
    with pytest.raises(runs.SettingsMismatch, match="K: 0 in the run, 3 now; pairs"):
        runs.check_settings(saved, now, Path("out"), may_change=("steps",))


# ------------------------------------------------------------------------------------------ divergence


def test_first_nonfinite_names_the_lowest_run_and_its_entry() -> None:
    good = torch.ones(3, 4)
    state = {"params": {"a": good, "b": good.clone()}, "adam": [{"exp_avg_sq": good.clone()}]}
    assert runs.first_nonfinite(state, batched=True) is None
    state["params"]["b"][2, 1] = math.inf
    state["adam"][0]["exp_avg_sq"][1, 3] = math.nan
    index, which, value = runs.first_nonfinite(state, batched=True)
    assert (index, which) == (1, "adam ([0].exp_avg_sq)") and math.isnan(value)
    assert runs.first_nonfinite({"loss": torch.tensor(math.inf)}) == (0, "loss", math.inf)
    # Sums that overflow are not divergence: the entries are finite.
    assert runs.first_nonfinite({"big": torch.full((2, 4), 3e38)}, batched=True) is None


def test_diverged_names_iteration_seed_and_checkpoint_and_pickles() -> None:
    error = runs.Diverged(7, 3, "generator Adam state (exp_avg_sq.w0)", math.inf, Path("out/checkpoint.pt"), 5)
    assert "at iteration 7 for seed 3" in str(error) and "(out/checkpoint.pt, iteration 5)" in str(error)
    again = pickle.loads(pickle.dumps(error))  # crosses from worker processes
    assert str(again) == str(error) and again.step == 7 and again.checkpoint_step == 5


def test_every_run_diverging_is_reported_not_a_crash(tmp_path: Path, cifar: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """At learning rate 1e30 every run diverges at its first iteration; the script still writes results.json."""
    out = tmp_path / "out"
    code = cifar10.main(IMG + ["--steps", "3", "--K", "0", "1", "--d-lr", "1e30", "--g-lr", "1e30",
                               "--data-dir", str(cifar), "--out", str(out)])
    assert code == 3
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "all runs diverged" and results["diversity_table"] == {}
    assert all(r["status"] == "diverged" and r["diverged_at"] == 1 for r in results["runs"])
    assert "diverged runs" in capsys.readouterr().out


@pytest.mark.skipif(not md.has_split("test"), reason=md.how_to_get("test"))
def test_every_mnist_rnn_run_diverging_is_reported_not_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = mnist_rnn.main(["--steps", "2", "--batch", "4", "--seeds", "0", "--K", "0", "2", "--d-lr", "1e30",
                           "--g-lr", "1e30", "--targets", "3", "--lbfgs-iters", "3", "--pairs", "50",
                           "--workers", "1", "--no-progress", "--out", str(out)])
    assert code == 3
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "all runs diverged" and len(results["runs"]) == 2


def test_a_nonfinite_state_with_finite_losses_stops_an_image_run_at_that_iteration() -> None:
    """Real images 1e25 times too large at iteration 3: the losses stay finite (batch norm), a parameter does
    not."""
    from unroll_examples import image_models as M

    calls = {"n": 0}

    def data(n: int, gen: torch.Generator) -> torch.Tensor:
        calls["n"] += 1
        return (torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1) * (1e25 if calls["n"] == 3 else 1)

    gan = it.ImageGAN("tiny", lambda: M.ConvGenerator((4, 2), 1, latent_dim=4),
                      lambda: M.ConvDiscriminator((2, 4), 1, image_size=8), data, latent_dim=4)
    trainer = it.GANTrainer(gan, it.GANConfig(K=2, batch=4, steps=6, seed=5))
    with pytest.raises(runs.Diverged, match="at iteration 3 for seed 5") as error:
        trainer.run()
    assert error.value.step == 3 and "loss" not in error.value.which and len(trainer.losses) == 2


# ------------------------------------------------------------------------------------------- the folder


def hold(out: Path) -> subprocess.Popen:
    """Another process that holds ``out`` (as a running script does) until it is killed."""
    code = ("import sys, time; from unroll_examples import runs; "
            "c = runs.claim(sys.argv[1], resume=None); c.__enter__(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(GAN)])})
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    holder = hold(out)
    try:
        assert mixture.main(MIX + ["--steps", "2", "--eval-every", "2", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {holder.pid})" in err and "Traceback" not in err
        assert not (out / runs.CHECKPOINT).exists()  # refused before anything was written
    finally:
        kill(holder)
    # The kernel dropped the dead holder's lock; its pid is still in the file: a stale lock, taken over.
    assert (out / runs.LOCK).read_text().strip() == str(holder.pid)
    assert mixture.main(MIX + ["--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    assert (out / runs.LOCK).read_text().strip() == str(os.getpid())


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(runs.LOCK).write_text(f"{dead.pid}\n")
    with runs.claim(tmp_path, resume=False):
        assert (tmp_path / runs.LOCK).read_text().strip() == str(os.getpid())


def test_claim_refuses_a_file_in_the_way_and_removes_a_killed_writers_temporaries(tmp_path: Path,
                                                                                  capsys: Any) -> None:
    (tmp_path / "file").write_text("x")
    assert mixture.main(MIX + ["--out", str(tmp_path / "file")]) == 2
    assert "a file is in the way" in capsys.readouterr().err
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "run" / "K0-seed0" / f".{runs.CHECKPOINT}.unroll-{dead.pid}-0123abcd.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    with runs.claim(tmp_path / "run", resume=False):
        assert not leftover.exists()


def test_oversize_seed_ranges_are_refused_before_allocating() -> None:
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match="names 1,000,000,001 seeds"):
        cli.parse_seeds("0-1000000000")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 1_000_000
    assert len(cli.parse_seeds(f"0-{cli.MAX_SEEDS - 1}")) == cli.MAX_SEEDS
    with pytest.raises(ValueError, match="at most"):
        cli.parse_seeds(f"0-{cli.MAX_SEEDS - 1},{cli.MAX_SEEDS}")


# --------------------------------------------------------------------------------- scripts and --resume


def test_mixture_resume_with_other_settings_is_refused_naming_them(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    assert mixture.main(MIX + ["--steps", "2", "--eval-every", "2", "--out", out]) == 0
    before = (tmp_path / "out" / "metrics.json").read_text()
    capsys.readouterr()
    assert mixture.main([*MIX, "--steps", "2", "--eval-every", "1", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "eval_every: 2 in the run, 1 now" in err and "Traceback" not in err
    assert (tmp_path / "out" / "metrics.json").read_text() == before
    assert mixture.main(MIX + ["--steps", "4", "--eval-every", "2", "--out", out, "--resume"]) == 0  # longer: fine


def test_image_resume_with_other_settings_is_refused_naming_them(tmp_path: Path, cifar: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Evaluation settings count (they used to be reused from the cache), and so does the list of runs (a --K
    that differs used to train the new K and overwrite results.json with it alone)."""
    out = tmp_path / "out"
    base = IMG + ["--steps", "2", "--K", "0", "1", "--data-dir", str(cifar), "--out", str(out)]
    assert cifar10.main(base) == 0
    before = (out / "results.json").read_text()
    capsys.readouterr()
    for flags, named in [(["--targets", "4"], "targets: 3 in the run, 4 now"),
                         (["--lbfgs-iters", "4"], "lbfgs_iters: 3 in the run, 4 now"),
                         (["--K", "3"], "K: [0, 1] in the run, [3] now")]:
        assert cifar10.main(base + flags + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
    assert (out / "results.json").read_text() == before and not (out / "K3-seed0").exists()
    # More iterations may be asked for: every run trains on and is evaluated again.
    assert cifar10.main(base + ["--steps", "3", "--resume"]) == 0
    assert [r["step"] for r in json.loads((out / "results.json").read_text())["runs"]] == [3, 3]


def test_cached_evaluations_are_reused_only_when_every_setting_matches(tmp_path: Path) -> None:
    from test_image_gans import tiny_gan  # noqa: E402 - the same tiny models

    calls: List[str] = []

    def evaluate(trainer: it.GANTrainer, spec: it.RunSpec, run_dir: Path) -> Dict[str, Any]:
        calls.append(spec.folder)
        return {"m": 1.0}

    specs = [it.RunSpec(tiny_gan(), it.GANConfig(K=K, batch=4, steps=2), {"K": K}) for K in (0, 1)]
    quiet = dict(log=lambda _: None)
    it.run_experiment(specs, tmp_path, evaluate, eval_settings={"targets": 3}, **quiet)
    it.run_experiment(specs, tmp_path, evaluate, resume=True, eval_settings={"targets": 3}, **quiet)
    assert calls == ["K0-seed0", "K1-seed0"]  # reused
    it.run_experiment(specs, tmp_path, evaluate, resume=True, eval_settings={"targets": 4}, **quiet)
    assert calls == ["K0-seed0", "K1-seed0"] * 2  # another setting: evaluated again


@pytest.mark.parametrize("damage", ["truncated", "empty", "crafted"])
def test_scripts_name_a_damaged_checkpoint_and_run_nothing_from_it(tmp_path: Path, cifar: Path, damage: str,
                                                                   capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    mix_out, img_out = tmp_path / "mix", tmp_path / "img"
    mix = MIX + ["--steps", "2", "--eval-every", "2", "--out", str(mix_out)]
    img = IMG + ["--steps", "2", "--K", "0", "--data-dir", str(cifar), "--out", str(img_out)]
    assert mixture.main(mix) == 0 and cifar10.main(img) == 0
    for path in (mix_out / runs.CHECKPOINT, img_out / "K0-seed0" / runs.CHECKPOINT):
        if damage == "crafted":
            torch.save({"config": {}, "state": Evil(marker)}, path)
        else:
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    (img_out / "K0-seed0" / it.RESULT).unlink()  # so that the run's checkpoint is read
    assert mixture.main(mix + ["--resume"]) == 2 and cifar10.main(img + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(mix_out / runs.CHECKPOINT) in err and str(img_out / "K0-seed0" / runs.CHECKPOINT) in err
    assert "Traceback" not in err and not marker.exists()


def test_a_truncated_checkpoint_ends_the_process_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mixture.main(MIX + ["--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    data = (out / runs.CHECKPOINT).read_bytes()
    (out / runs.CHECKPOINT).write_bytes(data[:len(data) // 3])
    process = script("mixture", *MIX, "--steps", "2", "--eval-every", "2", "--out", str(out), "--resume")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in err
    assert err.strip().startswith("error: ") and "truncated or corrupt" in err and str(out / runs.CHECKPOINT) in err


def run_with_kills(name: str, argv: List[str], out: Path, seed: int, kills: int, ready: Callable[[], bool]
                   ) -> None:
    """Run ``name`` to its end, SIGKILLing it ``kills`` times at random moments after ``ready()`` (a checkpoint
    exists), and continuing with ``--resume`` each time."""
    rng = random.Random(seed)
    for attempt in range(kills + 1):
        resume = ["--resume"] if ready() else []
        process = script(name, *argv, "--out", str(out), *resume)
        if attempt == kills:
            _, err = process.communicate(timeout=300)
            assert process.returncode == 0, err
            return
        wait_for(lambda: ready() or process.poll() is not None)  # noqa: B023 (called in this iteration)
        time.sleep(rng.uniform(0.0, 1.5))
        kill(process)


def test_mixture_killed_at_random_moments_resumes_to_the_uninterrupted_numbers(tmp_path: Path) -> None:
    argv = MIX + ["--steps", "24", "--eval-every", "8", "--checkpoint-every", "1"]
    assert mixture.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    run_with_kills("mixture", argv, part, seed=12, kills=2, ready=lambda: (part / runs.CHECKPOINT).exists())
    whole_meta, part_meta = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", part))
    assert part_meta["status"] == "done" and part_meta["records"] == whole_meta["records"]
    assert (tmp_path / "whole" / "metrics.csv").read_text() == (part / "metrics.csv").read_text()
    a, b = (runs.load_checkpoint(d / runs.CHECKPOINT) for d in (tmp_path / "whole", part))
    assert_same_tensors(a["state"], b["state"])


def test_image_script_killed_at_random_moments_resumes_to_the_uninterrupted_numbers(tmp_path: Path,
                                                                                   cifar: Path) -> None:
    argv = IMG + ["--steps", "12", "--K", "0", "1", "--data-dir", str(cifar)]
    assert cifar10.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    run_with_kills("cifar10", argv, part, seed=7, kills=2, ready=lambda: runs.has_checkpoints(part))
    whole, got = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "whole", part))
    assert comparable(got["runs"]) == comparable(whole["runs"]) and got["table"] == whole["table"]
    for run in ("K0-seed0", "K1-seed0"):
        a, b = (runs.load_checkpoint(d / run / runs.CHECKPOINT) for d in (tmp_path / "whole", part))
        assert_same_tensors(a["state"]["G"], b["state"]["G"])
        assert torch.equal(a["log"]["losses"], b["log"]["losses"])


@pytest.mark.skipif(not runs.can_fork(), reason="workers need the 'fork' start method")
def test_workers_die_with_their_parent(tmp_path: Path, cifar: Path) -> None:
    parent = script("cifar10", *IMG_ANY_WORKERS, "--workers", "2", "--steps", "100000", "--K", "0", "1", "--data-dir",
                    str(cifar), "--out", str(tmp_path / "out"), quiet=True)
    try:
        wait_for(lambda: len(children(parent.pid)) >= 2)  # both workers took a run
        workers = children(parent.pid)
    finally:
        kill(parent)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10)


# ------------------------------------------------------------------------------------------------ --help

SCRIPTS = [mixture, sweep_mixture, second_gradient, historical_averaging, mnist_rnn, stacked_mnist, colored_mnist,
           cifar10, mnist_classifier]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_help_describes_every_flag_and_shows_its_default(module: Any) -> None:
    p = module.build_parser()
    formatter = p._get_formatter()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no description"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue
        assert "default" in formatter._get_help_string(action), f"{action.option_strings} hides its default"
