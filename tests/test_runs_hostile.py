"""The run manager and the scripts under hostile input (issue 24, the experiment half): files that are not the run's
own are never touched, damaged or mismatching files are refused in one line with nothing changed, faults end in one
line with the lock released and the last checkpoint kept, and flags a run cannot honour are argparse errors.

Every test here failed before the change it covers. Tiny runs, one thread; where a process must really be
interrupted or lose a worker, ``subprocess`` and a signal.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import cifar10
import fig2
import mixture
import second_gradient
import stacked_mnist
import sweep_mixture
from test_runs import GAN, IMG, IMG_ANY_WORKERS, MIX, children, hold, kill, wait_for, write_cifar
from unroll_examples import cli, runs
from unroll_examples import digit_classifier as mc
from unroll_examples import image_training as it

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MIX_RUN = MIX + ["--steps", "2", "--eval-every", "2"]
FIG2 = ["--steps", "2", "--eval-every", "2", "--seeds", "0", "--K", "1", "--no-control", "--workers", "1",
        "--no-progress"]


def digest(folder: Path) -> Dict[str, str]:
    """Every file below ``folder`` (but the lock, whose pid a refused run rewrites) and its md5."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if p.name != runs.LOCK}


def one_line(err: str) -> str:
    """The one ``error:`` line that ends ``err`` (a script may have said what it starts before), no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def finished_mixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-iteration mixture run, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("template") / "mix"
    assert mixture.main(MIX_RUN + ["--out", str(out)]) == 0
    return out


@pytest.fixture
def mix_copy(finished_mixture: Path, tmp_path: Path) -> Path:
    out = tmp_path / "mix"
    shutil.copytree(finished_mixture, out)
    return out


# ----------------------------------------------------------------------------------------------- ownership


def test_temporaries_are_removed_only_when_a_dead_writer_of_the_run_manager_left_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "cell").mkdir(parents=True)
    ours = out / "cell" / f".{runs.CHECKPOINT}.unroll-{dead_pid()}-0123abcd.tmp"
    kept = [out / ".draft.tmp", out / "cell" / ".session.tmp",
            out / f".metrics.json.unroll-{os.getppid()}-0123abcd.tmp",  # a live writer's
            out / f".metrics.json.{dead_pid()}.0123abcd.tmp"]  # not the run manager's pattern
    for path in [ours, *kept]:
        path.write_bytes(b"user data")
    (out / runs.CHECKPOINT).write_bytes(b"x")
    with pytest.raises(runs.RunError, match="already holds a run"):
        with runs.claim(out, resume=False):
            pass
    assert ours.exists(), "a refused run removed a file"
    (out / runs.CHECKPOINT).unlink()
    with runs.claim(out, resume=False):
        assert not ours.exists()
    assert all(path.read_bytes() == b"user data" for path in kept)


def test_atomic_writes_use_the_pattern_only_the_run_manager_removes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (seen.append(Path(src).name), replace(src, dst)))
    runs.write_json(tmp_path / "a.json", {})
    assert runs._TMP_PATTERN.fullmatch(seen[0]) and f"-{os.getpid()}-" in seen[0]


def test_a_symlinked_lock_is_refused_and_its_target_left_untouched(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("my notes\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / runs.LOCK).symlink_to(target)
    assert mixture.main(MIX_RUN + ["--out", str(out)]) == 2
    assert "is not a plain file" in one_line(capsys.readouterr().err)
    assert target.read_text() == "my notes\n" and sorted(p.name for p in out.iterdir()) == [runs.LOCK]


def test_a_run_inside_or_above_a_held_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    outer = tmp_path / "fig2"
    holder = hold(outer)
    try:
        inner = outer / "fig2" / "ring_K1"
        assert mixture.main(MIX_RUN + ["--out", str(inner)]) == 2
        line = one_line(capsys.readouterr().err)
        assert f"inside {outer.resolve()}" in line and f"pid {holder.pid}" in line
        assert not (inner / "settings.json").exists()
        with pytest.raises(runs.FolderLocked, match=f"contains {outer.resolve()}"):
            with runs.claim(tmp_path, resume=None):
                pass
    finally:
        kill(holder)
    with runs.claim(outer / "inner", resume=None):  # the holder is gone: its lock is free
        pass


# ------------------------------------------------------------------------------------- damaged checkpoints


def damage(path: Path, change: Any) -> None:
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


CHECKPOINT_DAMAGE = {
    "negative step": (lambda c: c.update(step=-5), "not a whole number >= 0"),
    "string step": (lambda c: c.update(step="1"), "its step is str"),
    "bool step": (lambda c: c.update(step=True), "its step is bool"),
    "float step": (lambda c: c.update(step=1.5), "its step is float"),
    "step beyond --steps": (lambda c: c.update(step=99), "beyond --steps 3"),
    "settings not a dict": (lambda c: c.update(settings=7), "its settings is int"),
    "another format": (lambda c: c.update(format="unroll_examples final v1"), "not a 'unroll_examples checkpoint"),
    "no log": (lambda c: c.pop("log"), "no log"),
    "negative train_seconds": (lambda c: c.update(train_seconds=-1.0), "its train_seconds is -1.0"),
    "garbage snapshots": (lambda c: c["log"].update(snapshots=[(0, "garbage")]), "density snapshot"),
    "snapshots not a list": (lambda c: c["log"].update(snapshots=3), "its log's snapshots is 3, not list"),
    "garbage records": (lambda c: c["log"].update(records=[1]), "metrics record"),
    "another random stream": (lambda c: c["rng"].update(other=[]), "random streams ['extra', 'main', 'other']"),
    "adam moment of another shape": (lambda c: c["state"]["d_opt"]["exp_avg"].update(w0=torch.zeros(2, 3)),
                                     "state.d_opt.exp_avg.w0 is (2, 3)"),
    "negative adam step": (lambda c: c["state"]["g_opt"].update(step=-c["state"]["g_opt"]["step"]),
                           "g_opt step counts"),
}


@pytest.mark.parametrize("case", CHECKPOINT_DAMAGE)
def test_a_damaged_mixture_checkpoint_is_refused_with_nothing_changed(case: str, mix_copy: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    change, named = CHECKPOINT_DAMAGE[case]
    damage(mix_copy / runs.CHECKPOINT, change)
    before = digest(mix_copy)
    # --steps 3: settings.json would change too, if the run got that far.
    assert mixture.main(MIX + ["--steps", "3", "--eval-every", "2", "--out", str(mix_copy), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(mix_copy / runs.CHECKPOINT) in line and named in line, line
    assert digest(mix_copy) == before


@pytest.mark.parametrize("case", ["list", "string", "nested", "folder"])
def test_a_damaged_settings_file_is_refused_with_nothing_changed(case: str, mix_copy: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    settings = mix_copy / runs.SETTINGS
    settings.unlink()
    if case == "folder":
        settings.mkdir()
    else:
        settings.write_text({"list": "[1, 2]", "string": '"x"', "nested": "[" * 100_000 + "]" * 100_000}[case])
    before = digest(mix_copy)
    assert mixture.main(MIX_RUN + ["--out", str(mix_copy), "--resume"]) == 2
    assert str(settings) in one_line(capsys.readouterr().err)
    assert digest(mix_copy) == before


def test_an_image_checkpoint_with_adam_moments_of_another_shape_is_refused(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    cifar, out = write_cifar(tmp_path / "cifar"), tmp_path / "img"
    argv = IMG + ["--steps", "2", "--K", "0", "--data-dir", str(cifar), "--out", str(out)]
    assert cifar10.main(argv) == 0
    (out / "K0-seed0" / it.RESULT).unlink()  # so that the checkpoint is read
    path = out / "K0-seed0" / runs.CHECKPOINT

    def reshape(ckpt: Dict[str, Any]) -> None:
        state = next(iter(ckpt["state"]["d_opt"]["state"].values()))
        state["exp_avg"] = torch.zeros(3)

    damage(path, reshape)
    before = digest(out)
    capsys.readouterr()
    assert cifar10.main(argv + ["--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path) in line and "d_opt exp_avg" in line
    assert digest(out) == before


IMAGE_CHECKPOINT_DAMAGE = {
    "no discriminator": (lambda c: c["state"].pop("D"), "its state's D is None, not dict"),
    "latent stream missing": (lambda c: c["rng"].pop("latent"), "its rng's latent is None, not Tensor"),
    "losses not a tensor": (lambda c: c["log"].update(losses=[1.0, 2.0]), "its log's losses is [1.0, 2.0], not Tensor"),
    "losses of another length": (lambda c: c["log"].update(losses=torch.zeros(5, 2)), "losses of shape (5, 2) for 2"),
    "a final.pt in its place": (lambda c: c.update(format=runs.FINAL_FORMAT), "not a 'unroll_examples checkpoint"),
    "another model": (lambda c: c["settings"].update(model="other"), "model"),
}


@pytest.mark.parametrize("case", IMAGE_CHECKPOINT_DAMAGE)
def test_a_damaged_image_checkpoint_is_refused_with_nothing_changed(case: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """The image trainer reads the same checkpoint schema as the mixture trainer and checks its own parts of it
    (players, optimizer states, streams, losses) before using any."""
    cifar, out = write_cifar(tmp_path / "cifar"), tmp_path / "img"
    argv = IMG + ["--steps", "2", "--K", "0", "--data-dir", str(cifar), "--out", str(out)]
    assert cifar10.main(argv) == 0
    (out / "K0-seed0" / it.RESULT).unlink()  # so that the checkpoint is read
    path = out / "K0-seed0" / runs.CHECKPOINT
    change, named = IMAGE_CHECKPOINT_DAMAGE[case]
    damage(path, change)
    before = digest(out)
    capsys.readouterr()
    assert cifar10.main(argv + ["--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(path.parent) in line and named in line, line
    assert digest(out) == before


def test_a_classifier_cache_that_is_not_one_is_refused_not_overwritten(tmp_path: Path) -> None:
    config, path = mc.ClassifierConfig(), tmp_path / "clf.pt"
    torch.save([1, 2], path)
    with pytest.raises(runs.RunError, match="clf.pt is not a checkpoint"):
        mc.load_cached(path, config, "fingerprint")
    state = mc.DigitCNN(config.width).state_dict()
    state["head.5.weight"] = torch.zeros(3, 3)
    torch.save({"config": dataclasses.asdict(config), "fingerprint": "fingerprint", "state_dict": state,
                "report": {}}, path)
    with pytest.raises(runs.RunError, match=r"state_dict.head.5.weight is \(3, 3\)"):
        mc.load_cached(path, config, "fingerprint")


# --------------------------------------------------------------------------------- sweeps and fig2's cells


@pytest.fixture(scope="module")
def finished_fig2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("template") / "fig2"
    assert fig2.main(FIG2 + ["--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case", ["truncated", "list", "no records", "settings corrupted", "settings deleted"])
def test_fig2_refuses_damaged_or_mismatching_cells(case: str, finished_fig2: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fig2"
    shutil.copytree(finished_fig2, out)
    metrics = sorted(out.glob("fig2/*/metrics.json"))[0]
    flags = FIG2
    if case == "truncated":
        metrics.write_text(metrics.read_text()[:50])
    elif case == "list":
        metrics.write_text("[]")
    elif case == "no records":
        metrics.write_text(json.dumps({k: v for k, v in json.loads(metrics.read_text()).items() if k != "records"}))
    else:  # the case: a stored evaluation at other steps must not be summarised as this command's
        flags = [f if f != "2" or i != 3 else "1" for i, f in enumerate(FIG2)]  # --eval-every 1
        if case == "settings corrupted":
            (out / runs.SETTINGS).write_text("{")
        else:
            (out / runs.SETTINGS).unlink()
    before = digest(out)
    capsys.readouterr()
    assert fig2.main(flags + ["--out", str(out), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    expected = {"settings corrupted": "settings.json is not valid JSON",
                "settings deleted": "eval_every: 2 in the run, 1 now"}.get(case, str(metrics))
    assert expected in line, line
    assert digest(out) == before


SWEEP = ["--datasets", "ring", "--ks", "0", "--control-ks", "1", "--seeds", "0-1", "--steps", "2",
         "--eval-every", "2", "--batch", "16", "--eval-samples", "100", "--no-sensitivity", "--no-progress",
         "--timing-iterations", "1", "--timing-rounds", "1"]


def test_a_sweep_rerun_with_other_settings_is_refused_and_its_page_kept(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    where = ["--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "page.md"), "--fig-dir", str(tmp_path / "fig")]
    assert sweep_mixture.main(SWEEP + where) == 0
    before, page = digest(tmp_path / "runs"), (tmp_path / "page.md").read_text()
    for flag, value, named in [("--seeds", "2-3", "seeds: [0, 1] in the run, [2, 3] now"),
                               ("--batch", "32", "batch: 16 in the run, 32 now"),
                               ("--eval-samples", "200", "eval_samples: 100 in the run, 200 now")]:
        capsys.readouterr()
        changed = list(SWEEP)
        changed[changed.index(flag) + 1] = value
        assert sweep_mixture.main(changed + where) == 2
        assert named in one_line(capsys.readouterr().err)
        assert digest(tmp_path / "runs") == before and (tmp_path / "page.md").read_text() == page


def test_second_gradient_resume_with_other_seeds_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--seeds", "0-1", "--eval-samples", "100", "--eval-every", "2", "--steps", "2", "--ks", "0",
            "--regimes", "1", "--no-progress", "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "sg.md")]
    assert second_gradient.main(argv) == 0
    before = digest(tmp_path / "runs")
    capsys.readouterr()
    assert second_gradient.main([a if a != "0-1" else "0,2" for a in argv] + ["--resume"]) == 2
    assert "seeds: [0, 1] in the run, [0, 2] now" in one_line(capsys.readouterr().err)
    assert digest(tmp_path / "runs") == before


# ------------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("code, strerror", [(errno.ENOSPC, "No space left on device"),
                                            (errno.EACCES, "Permission denied")])
def test_a_full_disk_or_a_forbidden_file_ends_in_one_line_keeping_the_checkpoint(
        code: int, strerror: str, mix_copy: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    def fail(fd: int) -> None:
        raise OSError(code, strerror)

    monkeypatch.setattr(os, "fsync", fail)
    assert mixture.main(MIX + ["--steps", "4", "--eval-every", "2", "--out", str(mix_copy), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert strerror in line and "checkpoints written so far are kept" in line
    monkeypatch.undo()
    assert runs.load_checkpoint(mix_copy / runs.CHECKPOINT)["step"] == 2
    assert not list(mix_copy.glob(".*.tmp"))
    with runs.claim(mix_copy, resume=True):  # the lock was released
        pass


def test_ctrl_c_ends_in_one_line_with_code_130_keeping_the_checkpoint(mix_copy: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from unroll_examples import training

    def interrupt(self: Any, losses: Any) -> None:
        if self.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "_check_finite", interrupt)
    argv = MIX + ["--steps", "6", "--eval-every", "2", "--checkpoint-every", "1", "--out", str(mix_copy)]
    assert mixture.main(argv + ["--resume"]) == runs.EXIT_INTERRUPTED
    assert "interrupted; the checkpoints written so far are kept" in one_line(capsys.readouterr().err)
    assert runs.load_checkpoint(mix_copy / runs.CHECKPOINT)["step"] == 3
    with runs.claim(mix_copy, resume=True):
        pass


def as_from_a_terminal() -> None:
    """A foreground command started from a shell gets Ctrl-C's default handling; a child inherits its parent's
    disposition and mask, and the test process's may differ (pytest, or a test before this one, may ignore or
    block SIGINT), in which case Python would not turn Ctrl-C into KeyboardInterrupt at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.skipif(not runs.can_fork(), reason="workers need the 'fork' start method")
def test_ctrl_c_ends_a_parallel_run_in_one_line(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the workers ignore it, the parent stops them and says so once."""
    cifar, out = write_cifar(tmp_path / "cifar"), tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(GAN.parents[1])}
    process = subprocess.Popen([sys.executable, str(GAN / "cifar10.py"), *IMG_ANY_WORKERS, "--workers", "2",
                                "--steps", "100000", "--K", "0", "1", "--data-dir", str(cifar), "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=as_from_a_terminal)
    try:
        wait_for(lambda: len(children(process.pid)) >= 2)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            kill(process)
    assert process.returncode == 130 and "interrupted" in one_line(err), err
    with runs.claim(out, resume=None):  # the lock was released
        pass


def test_a_dead_worker_ends_in_one_line_and_a_bug_keeps_its_traceback(capsys: pytest.CaptureFixture) -> None:
    @runs.reports_errors
    def broken() -> int:
        runs.run_in_workers(lambda i: os.kill(os.getpid(), signal.SIGKILL), [0], 1, lambda _: None)
        return 0

    assert broken() == 2
    assert "a worker process died" in one_line(capsys.readouterr().err)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        runs.reports_errors(lambda: 1 // 0)()


# -------------------------------------------------------------------------------------------- CLI values


@pytest.mark.parametrize("module, flags, named", [
    (mixture, ["--d-lr", "inf"], "argument --d-lr: learning rates must be > 0 and finite"),
    (mixture, ["--g-lr", "nan"], "argument --g-lr: learning rates must be > 0 and finite"),
    (mixture, ["--unroll-lr", "1e400"], "argument --unroll-lr: learning rates must be > 0 and finite"),
    (mixture, ["--weight-std", "inf"], "argument --weight-std: must be finite"),
    (mixture, ["--weight-seed", str(2 ** 64)], "argument --weight-seed: must be in [0, 2**64)"),
    (mixture, ["--threads", "100000"], "argument --threads: must be >= 1 and at most"),
    (mixture, ["--batch", "1000000000"], "argument --batch: 1,000,000,000 needs at least 1.9 TiB of memory"),
    (mixture, ["--eval-samples", "1000000000"], "argument --eval-samples: 1,000,000,000 needs at least"),
    (mixture, ["--g-steps", "1000000000"], "argument --g-steps: 1,000,000,000 needs at least 3.8 TiB"),
    (fig2, ["--K", "1000000000"], "argument --K: 1,000,000,000 needs at least 7.5 TiB of memory"),
    (sweep_mixture, ["--ks", "0", "1000000000"], "argument --ks: 1,000,000,000 needs at least"),
    (stacked_mnist, ["--batch", "1000000000"], "argument --batch: 1,000,000,000 needs at least"),
    (stacked_mnist, ["--eval-samples", "1000000000"], "argument --eval-samples: 1,000,000,000 needs at least"),
    (cifar10, ["--d-lr", "inf"], "argument --d-lr: learning rates must be > 0 and finite"),
])
def test_values_a_run_cannot_honour_are_refused_at_the_command_line(
        module: Any, flags: List[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cli, "physical_memory", lambda: 16 * 2 ** 30)
    with pytest.raises(SystemExit) as exit_info:
        module.main(flags + ["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err, err
    if "memory" in named:
        assert "more than this machine's 16.0 GiB" in err
    assert not (tmp_path / "out").exists()
