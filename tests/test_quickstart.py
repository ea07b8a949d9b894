"""The README's quickstart runs and prints what it promises: K = 0 has no second term, K > 0 has one."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart.py"


def test_quickstart_prints_both_terms(capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    runpy.run_path(str(QUICKSTART), run_name="__main__")
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]]
            for line in capsys.readouterr().out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert sorted(rows) == [0, 1, 5, 10]
    full, first, second = rows[0]
    assert second == 0.0 and full == first
    assert all(rows[K][2] > 0 for K in (1, 5, 10))
    assert rows[1][2] < rows[5][2] < rows[10][2]
