"""Per-seed numbers of finished ``mixture.py`` runs in one JSON, and a table of each seed at chosen iterations.

The long single runs behind a results page (App. A's 10,000 iterations, the grid given time) are not sweep cells,
so no sweep writes their per-seed numbers; this does, from their run folders, so that a rerun can be checked
seed by seed:

    python examples/gan/collect_runs.py runs/appA_long/K10_unroll1e-3 runs/appA_long/K0_unroll1e-4 \\
        --json docs/results/mixture_app_a/app_a_long_runs.json --at 2000 5000 10000

writes ``{run folder name: {"config", "seeds", "records"}}`` (records: step, seed and the metrics of
``unroll_examples/metrics.py``) and
prints a markdown table: one row per run, one column per ``--at`` iteration, each cell
"strict modes / HQ %" per seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from unroll_examples import runs
from unroll_examples.cli import HelpFormatter
from unroll_examples.metrics import metric_records
from unroll_examples.sweeps import finished_run, table


def load_finished(folder: Path) -> Dict[str, Any]:
    """A finished run folder's configuration, seeds and per-seed metrics (refused if missing or unfinished)."""
    meta = finished_run(folder)
    return {"config": meta["config"], "seeds": meta["seeds"], "records": metric_records(meta["records"])}


def per_seed_cell(records: Sequence[Dict[str, Any]], step: int) -> str:
    """"strict modes / HQ %" of every seed at ``step``, seeds in order, e.g. ``7, 8, 8 / 3.0, 4.5, 6.3``."""
    at = sorted((r for r in records if r["step"] == step), key=lambda r: r["seed"])
    if not at:
        return "not evaluated"
    return (", ".join(str(r["modes_strict"]) for r in at) + " / "
            + ", ".join(f"{100 * r['hq']:.1f}" for r in at))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="finished mixture.py run folders")
    p.add_argument("--json", type=Path, required=True, help="where to write the per-seed numbers")
    p.add_argument("--at", type=int, nargs="+", default=[], help="iterations to show in the table")
    return p


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    names = [folder.name for folder in args.folders]
    if len(set(names)) != len(names):
        raise runs.RunError(f"run folders must have distinct names (they key the JSON), got {names}")
    collected = {folder.name: load_finished(folder) for folder in args.folders}
    runs.write_json(args.json, collected)
    rows: List[List[str]] = [[name] + [per_seed_cell(run["records"], step) for step in args.at]
                             for name, run in collected.items()]
    if args.at:
        print(table(rows, ["run"] + [f"{step:,}" for step in args.at]))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
