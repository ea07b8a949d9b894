"""What the sweeps over 2-D mixture runs share (``sweep_mixture.py`` and the App. B ablations): a sweep is a list
of :class:`Cell` (one configuration, all its seeds trained together in one run folder), trained in turn and
resumed cell by cell; the cells' metrics read back and Fig. 2-style figures (the page pieces: :mod:`report`)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import runs
from .data import make_mixture
from .plotting import density_histogram, histogram_extent, plot_density_grid

# The page pieces live in report.py; fig2.py, collect_runs.py and second_gradient.py import them from here.
from .report import fmt as fmt
from .report import summary_stats as summary_stats
from .report import table as table
from .runs import CHECKPOINT
from .training import DENSITY, Strategies, TrainConfig, Trainer, read_snapshots, run_name

METRICS = "metrics.json"
LOG = "sweep_log.json"
TIMING_FILE = "timing.json"
STATUSES = ("running", "done", "diverged")


@dataclass(frozen=True)
class Cell:
    """One row of a sweep: a configuration trained for all its seeds at once, in its own run folder."""

    group: str  # e.g. "main" or "sensitivity"
    label: str
    cfg: TrainConfig
    seeds: Tuple[int, ...]
    tag: str = ""  # tells apart cells whose TrainConfig is the same (e.g. different strategies)
    strategies: Optional[Strategies] = field(default=None, compare=False)

    @property
    def folder(self) -> str:
        tag = f"_{self.tag}" if self.tag else ""
        return f"{self.group}/{run_name(self.cfg)}{tag}_s{len(self.seeds)}_n{self.cfg.steps}"


CellMeta = Tuple[Cell, Optional[Dict[str, Any]]]
"""A cell and its run's ``metrics.json`` (None before it ran)."""


def checked_cells(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  build_cells: Callable[[argparse.Namespace], List[Cell]]) -> List[Cell]:
    """The sweep's cells from its flags; a bad flag (``ValueError`` from ``build_cells`` or a configuration) is
    an argparse error before anything is trained."""
    try:
        cells = build_cells(args)
        for cell in cells:
            cell.cfg.validate()
    except ValueError as error:
        parser.error(str(error))
    return cells


def load_run(folder: Path) -> Optional[Dict[str, Any]]:
    """A run folder's ``metrics.json`` (None if absent or unreadable)."""
    return runs.read_json(Path(folder) / "metrics.json")


def finished_run(folder: Path) -> Dict[str, Any]:
    """A finished run's ``metrics.json``; a folder without a readable one, or a run still going, is refused with
    a :class:`runs.RunError` (numbers read from it would change)."""
    meta = load_run(folder)
    if meta is None:
        raise runs.RunError(f"{folder}: no readable metrics.json (is it a mixture.py run folder?)")
    if meta.get("status") != "done":
        raise runs.RunError(f"{folder}: the run is not finished (metrics.json says {meta.get('status')!r})")
    return meta


def cell_settings(cell: Cell) -> Dict[str, Any]:
    """What makes a cell's numbers: its configuration and seeds (as its ``metrics.json`` stores them)."""
    return {**dataclasses.asdict(cell.cfg), "seeds": list(cell.seeds)}


def _metrics_problem(meta: Dict[str, Any]) -> Optional[str]:
    """What makes a run's ``metrics.json`` unusable (None when nothing does)."""
    if meta.get("status") not in STATUSES:
        return f"its status is {meta.get('status')!r}, not one of {', '.join(STATUSES)}"
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("seeds"), list):
        return "it has no config or no seeds"
    records = meta.get("records")
    if not isinstance(records, list) or not records:
        return "it has no records"
    if not all(isinstance(r, dict) and runs.is_a(r.get("step"), int) and r.get("seed") in meta["seeds"]
               for r in records):
        return "a record is not an evaluation of its seeds"
    return None


def read_cell(cell: Cell, folder: Path) -> Optional[Dict[str, Any]]:
    """The cell's ``metrics.json`` (None before it ran). A damaged one, or one made by other settings than the
    cell's (other seeds, batch, evaluation samples, ...), is a :class:`runs.RunError` naming the file and the
    settings: its numbers would be reported under a command that did not make them."""
    path = Path(folder) / METRICS
    meta = runs.read_json_file(path)
    if meta is None:
        return None
    problem = _metrics_problem(meta)
    if problem:
        raise runs.RunError(f"{path} is not a run's metrics ({problem}); delete {folder} (or restore a copy) to "
                            f"train that cell again")
    differences = runs.setting_differences({**meta["config"], "seeds": meta["seeds"]}, cell_settings(cell))
    if differences:
        raise runs.RunError(f"{folder} was trained with other settings than this command's "
                            f"({'; '.join(differences)}): its numbers are not this command's; use the same flags, "
                            f"or another --out")
    return meta


def _log_problem(log: List[Any]) -> Optional[str]:
    keys = {"cell": str, "seconds": (int, float), "from_step": int, "to_step": int, "seeds": int}
    for entry in log:
        if not isinstance(entry, dict) or not all(runs.is_a(entry.get(k), t) for k, t in keys.items()):
            return f"an entry {runs.brief(entry)} lacks one of {', '.join(keys)}"
    return None


def read_log(out_root: Path) -> List[Dict[str, Any]]:
    """The sweep's cost log (:func:`run_cells`); empty before the first cell; a damaged one is refused."""
    path = Path(out_root) / LOG
    log = runs.read_json_file(path, list) or []
    problem = _log_problem(log)
    if problem:
        raise runs.RunError(f"{path} is not a sweep's cost log ({problem}); delete it (or restore a copy)")
    return log


def read_timing(out_root: Path) -> Dict[str, float]:
    """The cells' timed cost per iteration (``timing.json``, by cell folder); a damaged file is refused."""
    path = Path(out_root) / TIMING_FILE
    known = runs.read_json_file(path) or {}
    if not all(runs.is_a(v, (int, float)) and v > 0 for v in known.values()):
        raise runs.RunError(f"{path} is not a timing file (seconds per iteration by cell folder); delete it")
    return known


def check_sweep(cells: Sequence[Cell], out_root: Path) -> None:
    """Everything a sweep will read back, checked before it writes anything (:func:`runs.claim`'s ``validate``):
    every cell's ``metrics.json`` (:func:`read_cell`) and checkpoint (read as a resume reads it), the cost log and
    the timings."""
    for cell in cells:
        folder = Path(out_root) / cell.folder
        read_cell(cell, folder)
        if (folder / CHECKPOINT).exists():
            # Reads the checkpoint back (validated); writes nothing.
            Trainer(cell.cfg, cell.seeds, out_dir=folder, strategies=cell.strategies, resume=True)
    read_log(out_root)
    read_timing(out_root)


def run_cell(cell: Cell, folder: Path, progress: bool, log: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Train one cell to its end (resuming its checkpoint, if any; a finished cell is left as it is) and append
    what it cost to ``log``. A diverged cell is reported and kept (its outputs stop where it diverged)."""
    meta = read_cell(cell, folder)
    if meta is not None and meta["status"] in ("done", "diverged"):
        return meta
    resume = (folder / CHECKPOINT).exists()
    start = time.time()
    trainer = Trainer(cell.cfg, cell.seeds, out_dir=folder, strategies=cell.strategies, resume=resume,
                      progress=progress)
    start_step = trainer.step
    try:
        trainer.run()
    except runs.Diverged as error:
        print(f"{cell.folder}: {error}", file=sys.stderr)
    log.append({"cell": cell.folder, "seconds": time.time() - start, "from_step": start_step,
                "to_step": trainer.step, "seeds": len(cell.seeds), "finished": time.strftime("%H:%M:%S")})
    return read_cell(cell, folder)


def run_cells(cells: Sequence[Cell], out_root: Path, progress: bool, report_only: bool,
              report: Callable[[List[Dict[str, Any]]], None]) -> List[Dict[str, Any]]:
    """Train every unfinished cell (resuming from checkpoints), calling ``report(log)`` after each one.

    Returns the cost log (``sweep_log.json`` under ``out_root``), which survives restarts, so a resumed sweep
    still reports what every cell took. With ``report_only`` nothing is trained.
    """
    log_path = out_root / LOG
    log = read_log(out_root)
    if not report_only:
        for i, cell in enumerate(cells):
            print(f"[{i + 1}/{len(cells)}] {cell.folder}", file=sys.stderr, flush=True)
            before = len(log)
            run_cell(cell, out_root / cell.folder, progress, log)
            if len(log) > before:
                runs.write_json(log_path, log)
            report(log)
    return log


def final_records(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The records of a run's last evaluation (one per seed)."""
    last = max(r["step"] for r in meta["records"])
    return [r for r in meta["records"] if r["step"] == last]


def finite_records(records: Sequence[Dict[str, Any]], metric: str = "reverse_kl") -> List[Dict[str, Any]]:
    """The records whose ``metric`` has a value (``metrics.json`` writes a missing one as ``null``; older files
    as NaN)."""
    return [r for r in records if r.get(metric) is not None and not math.isnan(r[metric])]


def figure_for(dataset: str, cells: Sequence[CellMeta], out_root: Path, path: Path, title: str) -> bool:
    """Fig. 2-style: rows = cells (first seed), columns = evaluation steps, last column the data; False if no
    cell has run yet."""
    rows = []
    for cell, meta in cells:
        if meta is None or not (out_root / cell.folder / DENSITY).exists():
            continue
        snapshots = read_snapshots(out_root / cell.folder)
        rows.append((f"{cell.label} (seed {cell.seeds[0]})", [(step, hist[0]) for step, hist in snapshots]))
    if not rows:
        return False
    mixture = make_mixture(dataset)
    extent = histogram_extent(mixture)
    data = density_histogram(mixture.sample(10_000, torch.Generator().manual_seed(0)), extent)
    plot_density_grid(rows, data, extent, path, title=title)
    return True


def page_status(metas: Sequence[CellMeta], complete: bool) -> str:
    """``"complete"`` when every cell finished (or diverged) and the sweep is over, else how many did."""
    done = sum(1 for _, m in metas if m is not None and m["status"] in ("done", "diverged"))
    return "complete" if complete and done == len(metas) else f"PARTIAL: {done} of {len(metas)} cells finished"
