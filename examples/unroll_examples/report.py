"""The pieces every results page is made of, so that all pages (``examples/gan``, ``examples/games``, the
benchmarks) render them the same way: markdown tables, mean ± standard error over seeds, the hand-written notes
kept across regenerations, the command that made the page, and the per-seed numbers written beside it.

Every page opens the same way (:func:`opening`): the title, a first paragraph that states the verdict with its
seeds count, its budget and its control (hand-written, kept across regenerations), then the page's main figure;
the settings and commands follow.

One convention for the spread over seeds: the standard error of the mean is s / √n with the sample standard
deviation s (n − 1 in the denominator). For a single seed it is undefined, so it is NaN here and a table shows
the single value alone, without "±" (never a made-up "± 0").
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from . import runs

NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


# ---- numbers over seeds ----

def mean_and_se(values: Sequence[Optional[float]]) -> Tuple[float, float]:
    """Mean and standard error of the mean, s / √n with s the sample standard deviation (n − 1); ``None``
    entries are left out. The standard error is NaN for one value (undefined), both are NaN for none."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return math.nan, math.nan
    se = statistics.stdev(x) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return statistics.fmean(x), se


def summary_stats(values: Sequence[float]) -> Dict[str, float]:
    """Mean, standard error of the mean (:func:`mean_and_se`: NaN for one value), median and count."""
    mean, se = mean_and_se(values)
    median = statistics.median([float(v) for v in values]) if len(values) else math.nan
    return {"mean": mean, "se": se, "median": median, "n": len(values)}


def _decimals(value: float, digits: int) -> int:
    """Decimal places that show ``value`` to ``digits`` significant figures (none for whole parts beyond them),
    counted after rounding (0.0999 to two figures is 0.10, not 0.100)."""
    def places(x: float) -> int:
        return 0 if x == 0 or not math.isfinite(x) else max(0, digits - 1 - math.floor(math.log10(abs(x))))

    return places(round(value, places(value)))


def plus_minus_sig(mean: float, spread: float, digits: int = 2) -> str:
    """``"mean ± spread"`` with the spread rounded to ``digits`` significant figures and the mean to the same
    decimal place (``144 ± 29``, ``6.07 ± 0.49``, ``0.294 ± 0.010``); when the spread is NaN (one seed:
    undefined) the mean alone, to ``digits + 1`` significant figures (``144``, ``6.07``)."""
    if math.isnan(spread):
        return _signed_text(mean, f".{_decimals(mean, digits + 1)}f")
    return plus_minus(mean, spread, f".{_decimals(spread, digits)}f")


def _signed_text(value: float, spec: str) -> str:
    """``format(value, spec)`` without the sign of a value that rounds to zero (``0.0``, not ``-0.0``)."""
    text = format(value, spec)
    return text[1:] if text.startswith("-") and math.isfinite(value) and float(text) == 0 else text


def plus_minus(mean: float, spread: float, mean_spec: str = ".2f", spread_spec: Optional[str] = None) -> str:
    """``"mean ± spread"`` with the format specs given (``spread_spec`` defaults to ``mean_spec``); the mean
    alone when the spread is NaN (one seed: undefined)."""
    text = _signed_text(mean, mean_spec)
    if math.isnan(spread):
        return text
    return f"{text} ± {format(spread, mean_spec if spread_spec is None else spread_spec)}"


def fmt(stats: Dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± s.e."`` of :func:`summary_stats`, both times ``scale``, ``digits`` decimals; ``"n/a"`` without
    values."""
    if stats["n"] == 0 or math.isnan(stats["mean"]):
        return "n/a"
    return plus_minus(scale * stats["mean"], scale * stats["se"], f".{digits}f")


# ---- the page's pieces ----

def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A markdown table: the header, a ``|---|`` rule, one line per row (cells as given)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def notes_markers(name: str = "") -> Tuple[str, str]:
    """The markers around a page's hand-written block ``name``: ``<!-- notes -->`` ... ``<!-- /notes -->`` for
    the unnamed block, ``<!-- notes:NAME -->`` ... ``<!-- /notes:NAME -->`` for a named one (a page may keep
    several, e.g. its verdict and its notes)."""
    if not name:
        return NOTES_BEGIN, NOTES_END
    if not name.replace("_", "").isalnum():
        raise ValueError(f"notes block name {name!r}: use letters, digits and underscores")
    return f"<!-- notes:{name} -->", f"<!-- /notes:{name} -->"


def kept_notes(doc: Path, default: str = "", name: str = "") -> str:
    """The hand-written text between the markers of block ``name`` (:func:`notes_markers`) of the existing page
    ``doc``; ``default`` when there is no such page or it has no such block."""
    path = Path(doc)
    text = path.read_text() if path.exists() else ""
    begin, end = notes_markers(name)
    start = text.find(begin)
    stop = text.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        return text[start + len(begin):stop]
    return default


def notes_block(doc: Path, default: str = "", name: str = "") -> str:
    """The markers of block ``name`` with :func:`kept_notes` between them: the lines a page keeps its notes in."""
    begin, end = notes_markers(name)
    return begin + kept_notes(doc, default, name) + end


def figure(doc: Path, path: Path, alt: str) -> str:
    """The markdown of the image ``path`` in the page ``doc`` (:func:`link_from`)."""
    return f"![{alt}]({link_from(doc, path)})"


def opening(doc: Path, main_figure: Optional[Tuple[Path, str]] = None, default_verdict: str = "") -> List[str]:
    """The lines a page opens with, right after its title: its verdict, a hand-written block (``verdict``, kept
    across regenerations; ``default_verdict`` on a new page) that states the verdict with its seeds count, its
    budget and its control, then the main figure ``(path, alt text)``, shown when the file exists."""
    lines = [notes_block(doc, default_verdict, "verdict"), ""]
    if main_figure is not None and Path(main_figure[0]).is_file():
        lines += [figure(doc, *main_figure), ""]
    return lines


def command_line(program: str, argv: Optional[Sequence[str]] = None, *, drop: Sequence[str] = (),
                 drop_with_value: Sequence[str] = ()) -> str:
    """``python <program> <flags>``, the flags shell-quoted, from ``argv`` (``sys.argv[1:]`` when None), without
    the flags in ``drop`` (e.g. ``--report-only``: it re-renders, it does not change the numbers) and without
    those in ``drop_with_value`` together with their value (``--note X``, ``--note=X``)."""
    flags: List[str] = []
    skip_next = False
    for arg in list(sys.argv[1:] if argv is None else argv):
        if skip_next:
            skip_next = False
        elif arg in drop_with_value:
            skip_next = True
        elif arg not in drop and not any(arg.startswith(f"{flag}=") for flag in drop_with_value):
            flags.append(arg)
    return " ".join(["python", program] + [shlex.quote(a) for a in flags])


def made_by(command: str, lead: str = "Made by:") -> List[str]:
    """The page's lines naming the command that made it: ``lead``, then the command in a code block."""
    return [lead, "", "```", command, "```"]


def link_from(doc: Path, path: Path) -> Path:
    """``path`` as a link in the page ``doc``: relative to the page's folder when it lies below it."""
    doc_dir, target = Path(doc).resolve().parent, Path(path).resolve()
    try:
        return target.relative_to(doc_dir)
    except ValueError:  # not below the page's folder
        return Path(path)


def write_per_seed(doc: Path, path: Path, numbers: Any, lead: str = "Per-seed numbers:") -> str:
    """Write ``numbers`` (every seed's numbers behind the page's means) to ``path`` as strict JSON, atomically
    (:func:`runs.write_json`: NaN and infinities become ``null``); the page's line that links it."""
    runs.write_json(Path(path), numbers)
    link = link_from(doc, path)
    return f"{lead} [{link}]({link})."


def safe_text(value: Any) -> bool:
    """A string from an untrusted file that cannot break out of a page's table cells, code spans or HTML comments
    (printable, no backtick, bar or angle bracket)."""
    return isinstance(value, str) and value.isprintable() and not set("`|<>") & set(value)


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite."""
    return runs.is_a(value, (int, float)) and math.isfinite(value)


class NumbersFileError(runs.RunError):
    """A file of numbers that cannot be a page's: reported as one line naming the file, before anything is
    written."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a JSON file of results may hold")


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} appears twice in one object")
    return dict(pairs)


def read_numbers(path: Path, problem: Callable[[Any], Optional[str]], advice: str,
                 max_bytes: int = 64 * 2 ** 20, label: str = "",
                 error: Type[NumbersFileError] = NumbersFileError) -> Any:
    """The numbers a page is written from, read from ``path`` as untrusted input: at most ``max_bytes``, UTF-8,
    strict JSON (no ``NaN`` or ``Infinity``: a missing number is ``null``; no key twice in one object) of which
    ``problem(payload)`` finds nothing wrong (None). Anything else raises ``error`` (a :class:`NumbersFileError`),
    one line: ``label`` and the file, the problem, then ``advice`` (what to do about it)."""
    path = Path(path)

    def refuse(what: str) -> NumbersFileError:
        return error(f"{label + ' ' if label else ''}{path} {what}; {advice}")

    if not path.is_file():
        raise refuse("does not exist" if not os.path.lexists(path) else "is not a file")
    if path.stat().st_size > max_bytes:
        raise refuse(f"is larger than {max_bytes} bytes")
    try:
        payload = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_refuse_constant,
                             object_pairs_hook=_unique_keys)
    except OSError as reason:
        raise refuse(f"cannot be read ({reason.strerror or reason})") from None
    except UnicodeDecodeError:
        raise refuse("is not UTF-8 text") from None
    except RecursionError:
        raise refuse("is not valid JSON (nested too deeply)") from None
    except ValueError as reason:
        raise refuse(f"is not valid JSON ({str(reason).splitlines()[0][:120]})") from None
    found = problem(payload)
    if found:
        raise refuse(found if found.startswith(("is ", "holds ")) else f"is damaged: {found}")
    return payload


def copy_beside_page(source: Path, target: Path) -> None:
    """Copy a run's file (a figure, its numbers) to ``target`` beside a results page, atomically: a link already
    at ``target`` is replaced, never written through. Nothing happens when ``source`` is missing or is ``target``
    itself (a page inside the run's folder)."""
    source, target = Path(source), Path(target)
    if source.is_file() and source.resolve() != target.resolve():
        runs.atomic_write_bytes(target, source.read_bytes())


def write_page(doc: Path, lines: Sequence[str]) -> None:
    """Write the page's lines, joined by newlines, atomically (a reader never sees half a page)."""
    runs.atomic_write_bytes(Path(doc), "\n".join(lines).encode())
