"""Run management shared by every experiment script: one writer per output folder, files that a kill never leaves
half written, checkpoints that hold only tensors and plain data, a resume that refuses other settings, divergence
named by its iteration and seed, and worker processes that die with their parent.

A script's life::

    @runs.reports_errors                     # a RunError, OSError, dead worker or Ctrl-C: one line, exit 2 (130)
    def main(argv=None):
        args = parse_args(argv)              # flags only: argparse errors, nothing written
        with runs.claim(out, resume=args.resume, settings=settings, may_change=("steps",)):
            ...                              # train: runs.save_checkpoint / runs.load_checkpoint, runs.write_json

:func:`claim` creates ``out``, takes its lock (a second writer is refused, the message names the holder's pid; the
lock is an ``flock`` that the kernel drops when its process dies, so a killed run never leaves a stale lock; a
``.lock`` that is a symbolic link is refused, never followed), refuses a folder inside or above one another run
holds, checks ``--resume`` against the checkpoints the folder holds, compares the settings stored in
``settings.json`` with the new ones (a difference is refused, naming the settings), and lets the script check
everything else it will read back, all before it writes anything; it removes only the temporary files of dead
writers of its own. :func:`load_checkpoint` reads
with ``torch.load(weights_only=True)``: a file that asks for anything but tensors and plain containers is refused
unread, and a truncated, empty or garbage file is named in a clear error. :func:`first_nonfinite` finds the first
NaN or infinity in losses, parameters or optimizer states, for :class:`Diverged`. :func:`run_in_workers` runs
tasks in forked processes that exit as soon as their parent is gone.

Only the standard library and torch are used, so examples other than the GANs can use it as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import secrets
import signal
import stat
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

try:  # POSIX (Linux, macOS): the platforms whose processes can fork, which the workers need anyway
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

CHECKPOINT = "checkpoint.pt"
SETTINGS = "settings.json"
LOCK = ".lock"
# A temporary file of atomic_write_bytes: ``.<name>.unroll-<pid>-<8 hex>.tmp``, a name no user picks, carrying the
# writer's pid so that claim can tell a dead writer's leftover from a live writer's file (or a user's).
_TMP_PATTERN = re.compile(r"\.(?P<name>.+)\.unroll-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{8}\.tmp")
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------- errors


class RunError(Exception):
    """A problem with an output folder or a checkpoint: reported as one line (exit code 2), never a traceback."""


class CheckpointError(RunError):
    """A checkpoint that cannot be read: missing, truncated, empty, corrupt, or holding more than data."""


class SettingsMismatch(RunError, ValueError):
    """``--resume`` with settings other than the run's (a ``ValueError`` too, as before run management)."""


class FolderLocked(RunError):
    """Another process writes to the same output folder."""


class Diverged(FloatingPointError):
    """A loss, parameter or optimizer state became NaN or infinite at iteration ``step`` (1-based) of seed
    ``seed``. ``checkpoint`` / ``checkpoint_step``: the last good checkpoint, kept untouched (``checkpoint`` is None
    for a run kept in memory; ``checkpoint_step`` is None when none was written yet)."""

    def __init__(self, step: int, seed: int, which: str, value: float, checkpoint: Optional[Path] = None,
                 checkpoint_step: Optional[int] = None) -> None:
        if checkpoint is None:
            kept = "nothing was written"
        elif checkpoint_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = f"the last good checkpoint ({checkpoint}, iteration {checkpoint_step}) and outputs are kept"
        super().__init__(f"training diverged: non-finite {which} ({value}) at iteration {step} for seed {seed}; "
                         f"{kept}")
        self.step, self.seed, self.which, self.value = step, seed, which, value
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step

    def __reduce__(self) -> Tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.step, self.seed, self.which, self.value, self.checkpoint, self.checkpoint_step))


def _fault_message(error: BaseException) -> Optional[Tuple[str, int]]:
    """The one line and exit code a script ends with on ``error``; None for an error that is a bug (kept as a
    traceback). Checkpoints are written atomically, so whatever stops a run leaves the last one whole."""
    kept = "the checkpoints written so far are kept whole; --resume continues from the last"
    if isinstance(error, RunError):
        return str(error), 2
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted; {kept}", EXIT_INTERRUPTED
    if isinstance(error, BrokenProcessPool):
        return f"a worker process died (killed, or out of memory); the other workers were stopped; {kept}", 2
    if isinstance(error, OSError) and error.errno is not None:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or os.strerror(error.errno)}{where}; {kept}", 2
    return None


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a script's ``main(argv)``: a :class:`RunError`, an operating-system error (a full disk, a file it may
    not write), a dead worker process and Ctrl-C each print one line ``error: <message>`` to stderr and return 2
    (130 for Ctrl-C). Locks are released by :func:`claim` as the error passes; other exceptions are bugs and
    propagate with their traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except (RunError, KeyboardInterrupt, BrokenProcessPool, OSError) as error:
            fault = _fault_message(error)
            if fault is None:
                raise
            print(f"error: {fault[0]}", file=sys.stderr)
            return fault[1]

    return wrapper


# ------------------------------------------------------------------------------------------------- files


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file of a name no other writer uses, then ``os.replace``:
    readers and a later resume see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.unroll-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by ``None`` (JSON's ``null``) and tuples by lists: strict JSON
    readers reject the ``NaN`` literals Python's json module writes by default."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_bytes(obj: Any) -> bytes:
    """What :func:`write_json` writes for ``obj``."""
    return (json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (see :func:`strict_json`), written atomically."""
    atomic_write_bytes(Path(path), json_bytes(obj))


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or None if it is missing or unreadable (for files whose loss costs nothing; the run
    manager's own files are read with :func:`read_json_file`)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def read_json_file(path: Path, expect: type = dict) -> Optional[Any]:
    """The JSON in ``path`` (None when there is no such file), which must be an ``expect`` (a dict or a list).
    Anything else (a folder, unreadable, truncated, not JSON, nested too deeply for Python, another type) raises
    a :class:`RunError` naming the file: a run never guesses what a damaged file of its own meant."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    advice = "delete it (or restore a copy) or choose another --out"
    try:
        value = json.loads(path.read_text())
    except IsADirectoryError:
        raise RunError(f"{path} is a folder where a JSON file is expected; {advice}") from None
    except OSError as error:
        raise RunError(f"{path} cannot be read ({error.strerror or error}); {advice}") from None
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).splitlines()[0][:120]
        raise RunError(f"{path} is not valid JSON (truncated or corrupt: {reason}); {advice}") from None
    if not isinstance(value, expect):
        raise RunError(f"{path} holds a JSON {type(value).__name__} where a {expect.__name__} is expected; "
                       f"{advice}")
    return value


def save_checkpoint(payload: Mapping[str, Any], path: Path) -> None:
    """Atomically save ``payload``: tensors and plain data only (dicts, lists, tuples, str, numbers, None), so
    :func:`load_checkpoint` can read it without unpickling code."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


ADVICE = "delete it (or restore a copy) to start that run over"


def is_a(value: Any, kind: Any) -> bool:
    """``isinstance`` in which a bool is not an int (``True`` is no iteration number)."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        return False
    return isinstance(value, kind)


def type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def load_checkpoint(path: Path, required: Sequence[str] = (), types: Optional[Mapping[str, Any]] = None
                    ) -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU. Raises :class:`CheckpointError`
    naming the file when it is missing, truncated, empty, corrupt, asks to build anything but tensors and plain
    containers (refused before anything in it runs), lacks one of the ``required`` keys, or holds a value of
    another type than ``types`` names for its key (a type or a tuple of types; a bool is not an int)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"there is no checkpoint {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error.__context__ or error).strip().splitlines()[-1]
        raise CheckpointError(f"{path} holds something other than tensors and plain data, or is corrupt "
                              f"({reason}); it was refused without running anything in it; {ADVICE}") from None
    except Exception as error:  # noqa: BLE001 - every way a file can be truncated or garbage
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint: truncated or corrupt "
                              f"({type(error).__name__}: {reason}); {ADVICE}") from None
    missing = [key for key in required if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this experiment (no {', '.join(missing)}); {ADVICE}")
    for key, kind in (types or {}).items():
        if key in ckpt and not is_a(ckpt[key], kind):
            raise CheckpointError(f"{path}: its {key} is {type(ckpt[key]).__name__} {brief(ckpt[key])}, not "
                                  f"{type_name(kind)}; {ADVICE}")
    return ckpt


def brief(value: Any) -> str:
    text = repr(value) if not isinstance(value, Tensor) else f"of shape {tuple(value.shape)}"
    return text if len(text) <= 40 else text[:37] + "..."


def checkpoint_step(ckpt: Mapping[str, Any], path: Path, steps: int) -> int:
    """The checkpoint's iteration ``ckpt["step"]``: a whole number from 0 to ``steps`` (the run's ``--steps``),
    else a :class:`CheckpointError` naming the file (a negative or fractional iteration would continue from the
    wrong place; one beyond ``--steps`` has nothing left to train)."""
    step = ckpt["step"]
    if not is_a(step, int) or step < 0:
        raise CheckpointError(f"{path}: its iteration (step) is {brief(step)}, not a whole number >= 0; {ADVICE}")
    if step > steps:
        raise CheckpointError(f"{path} is at iteration {step}, beyond --steps {steps}: pass --steps {step} or more "
                              f"to continue it")
    return step


def require(ok: bool, path: Path, problem: str) -> None:
    """Raise a :class:`CheckpointError` ``"<path> does not fit this run (<problem>)"`` unless ``ok``."""
    if not ok:
        raise CheckpointError(f"{path} does not fit this run ({problem}); {ADVICE}")


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an error while applying a loaded checkpoint (a wrong key, type or shape) into a
    :class:`CheckpointError` naming the file."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise CheckpointError(f"{path} does not fit this run ({type(error).__name__}: {error}); {ADVICE}") from None


def layout_difference(expected: Any, got: Any, path: str = "state") -> Optional[str]:
    """The first place where the nested dicts of tensors ``got`` differ from ``expected`` in keys, shape or dtype
    (None when they match): a checkpoint must hold exactly the state the run would have."""
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(expected):
            return f"{path} has entries {sorted(got) if isinstance(got, Mapping) else type(got).__name__}, " \
                   f"expected {sorted(expected)}"
        for key in expected:
            difference = layout_difference(expected[key], got[key], f"{path}.{key}")
            if difference:
                return difference
        return None
    if not isinstance(got, Tensor) or got.shape != expected.shape or got.dtype != expected.dtype:
        what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got).__name__
        return f"{path} is {what}, expected {tuple(expected.shape)} {expected.dtype}"
    return None


# ---------------------------------------------------------------------------------------------- settings


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(strict_json(value), default=str))


def setting_differences(saved: Mapping[str, Any], now: Mapping[str, Any], may_change: Sequence[str] = ()
                        ) -> List[str]:
    """``"name: <saved> in the run, <now> now"`` for every setting that differs, except those in ``may_change``."""
    missing = "(not set)"
    return [f"{name}: {saved.get(name, missing)} in the run, {now.get(name, missing)} now"
            for name in sorted(set(saved) | set(now)) if name not in may_change
            and _comparable(saved.get(name, missing)) != _comparable(now.get(name, missing))]


def check_settings(saved: Mapping[str, Any], now: Mapping[str, Any], where: Path,
                   may_change: Sequence[str] = ()) -> None:
    """Raise :class:`SettingsMismatch` naming every differing setting: resuming with them would silently mix two
    runs in one set of results."""
    differences = setting_differences(saved, now, may_change)
    if differences:
        raise SettingsMismatch(f"--resume: {where} was made with other settings ({'; '.join(differences)}); use "
                               f"the same flags or another --out")


# ------------------------------------------------------------------------------ one schema for every training run


CHECKPOINT_FORMAT = "unroll_examples checkpoint v1"
FINAL = "final.pt"
"""A finished run's exported state (:func:`write_final`): what tools read (never the checkpoint, which is the
run's own, rewritten while it trains)."""
FINAL_FORMAT = "unroll_examples final v1"
_RUN_TYPES = {"format": str, "settings": dict, "step": int, "train_seconds": (int, float), "state": dict, "rng": dict,
              "log": dict}


@dataclass(frozen=True)
class Checkpoint:
    """Everything a training run needs to continue, in one schema for every trainer (the 2-D mixtures and the
    image GANs): the ``settings`` that define its numbers, its iteration ``step``, the time spent training, the
    players' and optimizers' ``state``, the random streams' states ``rng`` and what it has measured so far, ``log``.
    What is inside ``state``, ``rng`` and ``log`` is the trainer's to check (:func:`layout_difference`)."""

    settings: Dict[str, Any]
    step: int
    train_seconds: float
    state: Dict[str, Any]
    rng: Dict[str, Any]
    log: Dict[str, Any]

    def payload(self, kind: str) -> Dict[str, Any]:
        return {"format": kind, **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}}


def write_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Atomically save ``checkpoint`` (tensors and plain data only)."""
    save_checkpoint(checkpoint.payload(CHECKPOINT_FORMAT), path)


def read_checkpoint(path: Optional[Path], now: Mapping[str, Any], may_change: Sequence[str], steps: int
                    ) -> Checkpoint:
    """The checkpoint a run resumes from, refused with a :class:`CheckpointError` naming the file unless it is a
    checkpoint of this schema whose iteration lies in 0..``steps``, and with :class:`SettingsMismatch` unless it
    was made with the settings ``now`` but for ``may_change``."""
    if path is None:
        raise RunError("resume needs an output folder")
    ckpt = _read_run_file(path, CHECKPOINT_FORMAT)
    check_settings(ckpt["settings"], now, path.parent, may_change)
    return _as_checkpoint(ckpt, checkpoint_step(ckpt, path, steps))


def write_final(path: Path, checkpoint: Checkpoint) -> None:
    """Export a finished run's state for the tools that start from it or draw it (:func:`read_final`)."""
    save_checkpoint(checkpoint.payload(FINAL_FORMAT), path)


def read_final(path: Path) -> Checkpoint:
    """A finished run's exported state (:func:`write_final`), validated like a checkpoint."""
    ckpt = _read_run_file(path, FINAL_FORMAT)
    return _as_checkpoint(ckpt, checkpoint_step(ckpt, path, ckpt["step"]))


def _read_run_file(path: Path, kind: str) -> Dict[str, Any]:
    ckpt = load_checkpoint(path, tuple(_RUN_TYPES), _RUN_TYPES)
    if ckpt["format"] != kind:
        raise CheckpointError(f"{path} is a {brief(ckpt['format'])} file, not a {kind!r} one; {ADVICE}")
    if not math.isfinite(ckpt["train_seconds"]) or ckpt["train_seconds"] < 0:
        raise CheckpointError(f"{path}: its train_seconds is {brief(ckpt['train_seconds'])}; {ADVICE}")
    return ckpt


def _as_checkpoint(ckpt: Mapping[str, Any], step: int) -> Checkpoint:
    return Checkpoint(dict(ckpt["settings"]), step, float(ckpt["train_seconds"]), dict(ckpt["state"]),
                      dict(ckpt["rng"]), dict(ckpt["log"]))


# ------------------------------------------------------------------------------------------- the folder


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class RunLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, which holds the owner's pid. The kernel releases it when the
    owner exits or is killed, so a lock left by a dead process is simply taken over. The lock is opened with
    ``O_NOFOLLOW`` and must be a plain file: a symbolic link there is refused, never followed (it would make the
    run write its pid into the link's target)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            raise RunError(f"{self.path} is not a plain file (a symbolic link, a folder, ...): a run's lock is a "
                           f"file it makes itself, and another thing there is left untouched; remove it or choose "
                           f"another --out")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderLocked(f"{self.path.parent} is in use by another run (pid {holder}); two runs writing "
                                   f"one folder would overwrite each other's files: wait for it, stop it, or "
                                   f"choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_holder(lock: Path) -> Optional[str]:
    """The pid written in the run lock ``lock`` when a process holds it, else None (no lock, a free one, not a
    plain file, or one that holds no pid: another program's). Probed with a shared, non-blocking ``flock`` on a
    descriptor of its own, released at once."""
    if fcntl is None:  # pragma: no cover - no locks on Windows
        return None
    try:
        fd = os.open(lock, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return holder if holder.isdigit() else None  # another program's lock file: not a run's
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_nested(out: Path) -> None:
    """Refuse ``out`` when a folder above it or below it is held by another run: each run locks only its own
    folder, and two runs in one tree (``mixture.py --out`` inside a cell that ``fig2.py`` trains, or a sweep
    started above a running one) would overwrite each other's files."""
    out = Path(out).resolve()
    for folder in out.parents:
        holder = lock_holder(folder / LOCK)
        if holder is not None:
            raise FolderLocked(f"--out {out} is inside {folder}, which another run holds (pid {holder}); a run "
                               f"there may write into this folder: wait for it, stop it, or choose another --out")
    for folder, _subfolders, files in os.walk(out):  # does not follow symbolic links
        if Path(folder) != out and LOCK in files:
            holder = lock_holder(Path(folder) / LOCK)
            if holder is not None:
                raise FolderLocked(f"--out {out} contains {folder}, which another run holds (pid {holder}); this "
                                   f"run could write into it: wait for it, stop it, or choose another --out")


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts; a number that is no pid does too: only a
    provably dead writer's files are removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def dead_writers_temporaries(out: Path) -> List[Path]:
    """The temporary files :func:`atomic_write_bytes` left in ``out`` (or below) when its process was killed:
    named by its exact pattern (``.<name>.unroll-<pid>-<8 hex>.tmp``) with the pid of no running process, and
    plain files. A user's ``.draft.tmp``, or a live writer's temporary, is never among them."""
    found = []
    for folder, _, files in os.walk(out):
        for name in files:
            match = _TMP_PATTERN.fullmatch(name)
            path = Path(folder) / name
            if match and not _alive(int(match["pid"])) and stat.S_ISREG(path.lstat().st_mode):
                found.append(path)
    return found


def has_checkpoints(folder: Path) -> bool:
    """Whether ``folder`` or any folder below it holds a checkpoint."""
    return any(Path(folder).rglob(CHECKPOINT))


@contextlib.contextmanager
def claim(out: Path, resume: Optional[bool], settings: Optional[Mapping[str, Any]] = None,
          may_change: Sequence[str] = (), validate: Optional[Callable[[], None]] = None) -> Iterator[Path]:
    """Hold ``out`` for this process while the block runs.

    Creates ``out`` and locks it (:class:`RunLock`); refuses it when a folder above or below is held by another
    run (:func:`check_not_nested`); then checks: ``resume=True`` needs a checkpoint in ``out`` (or below),
    ``resume=False`` needs none, ``resume=None`` takes either (sweeps continue their cells implicitly).
    ``settings`` (JSON-able) are compared with those stored in ``out/settings.json`` when resuming (any difference
    outside ``may_change`` is refused, naming it; a damaged settings file is refused too). ``validate()`` then
    checks whatever else the run will read back (its checkpoints and stored results) and raises
    :class:`RunError` for anything it cannot use. Only when everything passed are a killed writer's temporary files
    removed (:func:`dead_writers_temporaries`) and the settings stored: a refused run changes nothing but the pid
    in ``.lock``.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        lock.acquire()
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"--out {out}: a file is in the way of the output folder") from None
    except OSError as error:
        raise RunError(f"--out {out}: cannot write there ({error.strerror or error})") from None
    try:
        check_not_nested(out)
        held = has_checkpoints(out)
        if resume is True and not held:
            raise RunError(f"--resume: {out} holds no checkpoint to continue")
        if resume is False and held:
            raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        saved = read_json_file(out / SETTINGS) if settings is not None else None
        if settings is not None and held and saved is not None:
            check_settings(saved, settings, out, may_change)
        if validate is not None:
            validate()
        for tmp in dead_writers_temporaries(out):
            tmp.unlink()
        if settings is not None and (saved is None or (out / SETTINGS).read_bytes() != json_bytes(settings)):
            write_json(out / SETTINGS, settings)  # unchanged bytes are not rewritten
        yield out
    finally:
        lock.release()


# ------------------------------------------------------------------------------------------- divergence


def _leaves(tree: Any, path: str = "") -> Iterator[Tuple[str, Tensor]]:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{path}[{i}]")
    elif isinstance(tree, Tensor) and tree.is_floating_point():
        yield path, tree.detach()


@torch.no_grad()
def first_nonfinite(groups: Mapping[str, Any], batched: bool = False) -> Optional[Tuple[int, str, float]]:
    """The first NaN or infinity in ``groups`` (``{"generator parameters": tensors, ...}``, each a nested
    dict/list/tuple of tensors): ``(index, "group (entry)", value)``, or None when everything is finite.

    With ``batched``, every tensor's first dimension indexes runs (vmapped seeds), and ``index`` is the lowest run
    with a non-finite entry; else ``index`` is 0. One sum per tensor checks everything at once; only when a sum is
    not finite (a non-finite entry, or an overflow of the sum) are the entries searched.
    """
    leaves = [(f"{group} ({path})" if path else group, leaf) for group, tree in groups.items()
              for path, leaf in _leaves(tree)]
    if not leaves:
        return None
    sums = [leaf.reshape(leaf.shape[0], -1).sum(1) if batched else leaf.sum().reshape(1) for _, leaf in leaves]
    # One device for the check: torch.optim keeps step counters on the CPU while the parameters may be on a GPU.
    device = next((s.device for s in sums if s.device.type != "cpu"), sums[0].device)
    if bool(torch.isfinite(torch.cat([s.float().to(device) for s in sums])).all()):
        return None
    best: Optional[Tuple[int, str, float]] = None
    for name, leaf in leaves:
        bad = ~torch.isfinite(leaf.reshape(leaf.shape[0], -1) if batched else leaf.reshape(1, -1))
        rows = bad.any(1).nonzero()
        if rows.numel() and (best is None or int(rows[0, 0]) < best[0]):
            index = int(rows[0, 0])
            value = float(leaf.reshape(bad.shape)[index][bad[index]][0])
            best = (index, name, value)
    return best


# ---------------------------------------------------------------------------------------------- workers


def can_fork() -> bool:
    """Whether :func:`run_in_workers` is available: tasks go to forked processes (Linux, macOS), because they are
    closures (models, data samplers, evaluators) that cannot be pickled for a spawned one."""
    return "fork" in multiprocessing.get_all_start_methods()


# The task of run_in_workers: set just before the fork, inherited by the children.
_TASK: Dict[str, Callable[[int], Any]] = {}


def _die_with_parent(parent: int) -> None:
    """Worker initializer: exit at once when the parent is gone (else a killed parent leaves workers that go on
    training and writing into a folder nobody holds). Ctrl-C reaches every process of the terminal's group: the
    workers ignore it and the parent, which stops them, reports it in one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while it forked us
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _call_task(index: int) -> Any:
    return _TASK["task"](index)


def run_in_workers(task: Callable[[int], T], indices: Sequence[int], workers: int,
                   on_result: Callable[[T], None]) -> None:
    """``task(i)`` for every ``i`` in ``indices`` (in that order of start), in ``workers`` forked processes that
    inherit this process's memory; ``on_result`` gets each result as it arrives. The first error (or Ctrl-C)
    stops the other workers at once and is raised here; workers exit by themselves if this process dies."""
    if not can_fork():
        raise RuntimeError("workers > 1 needs the 'fork' start method, which this platform does not have")
    context = multiprocessing.get_context("fork")
    before = set(context.active_children())
    _TASK["task"] = task
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            try:
                # Workers are forked while tasks are submitted: Ctrl-C waits until then, so that none is forked
                # before it ignores it, and the pool is never left waiting on workers that ignore it.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    futures = [pool.submit(_call_task, i) for i in indices]
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                for future in as_completed(futures):
                    on_result(future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                workers_left = set(context.active_children()) - before
                for child in workers_left:
                    child.terminate()
                for child in workers_left:  # one that outlives SIGTERM would keep the pool's shutdown waiting
                    child.join(timeout=5)
                    if child.is_alive():
                        child.kill()
                raise
    finally:
        _TASK.clear()
