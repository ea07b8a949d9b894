"""Command-line pieces every script shares: a help formatter that shows every default, ``--seeds`` ranges, and the
argparse ``type=`` validators that refuse, at the command line, values a run cannot honour: learning rates that
are infinite or NaN, seeds beyond 64 bits, thread counts far beyond the machine's cores, and sizes whose memory
the machine does not have (each message names the flag, through argparse, and the memory it would need); and
configurations from one source: :func:`option` keeps a dataclass field's default, help text and validator together,
:func:`add_config_flags` makes a flag of every field, :func:`config_from_args` builds the configuration back."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

MAX_SEEDS = 1000
"""The most seeds one ``--seeds`` may name: they are trained at once (vmapped), each with its own parameters,
Adam states and data streams, so a range such as ``0-1000000000`` is refused before anything is allocated."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every flag whose help does not state
    its default already; on/off switches and flags resolved later (default ``None``) state theirs in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is skip for skip in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def parse_seeds(text: str, limit: int = MAX_SEEDS) -> List[int]:
    """``"0-9"``, ``"0,3,7"`` or a mix (``"0-2,7"``) -> distinct non-negative seeds, at most ``limit`` of them
    (checked before a range is expanded)."""
    seeds: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            low, high = int(lo), int(hi)
            if high < low:
                raise ValueError(f"empty seed range {part!r}")
            if len(seeds) + high - low + 1 > limit:
                raise ValueError(f"--seeds {text!r} names {high - low + 1:,} seeds in {part!r}; at most {limit:,} "
                                 f"are trained at once")
            seeds.extend(range(low, high + 1))
        else:
            seeds.append(int(part))
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {text!r}")
    if len(seeds) > limit:
        raise ValueError(f"--seeds {text!r} names {len(seeds):,} seeds; at most {limit:,} are trained at once")
    return seeds


DEFAULT_THREADS = 1
"""torch's CPU threads per process. One is the fastest for these small models: on the shared 2-core machine,
200 iterations of ``mixture.py --K 5`` (batch 512, 5 seeds) took 154-213 s with one thread and 1,045 s with two
(``examples/gan/README.md`` has the command); the timings in the docs are for one."""


def max_threads() -> int:
    """The most ``--threads`` taken: four per CPU core (more threads than cores only slow torch down; tens of
    thousands make it fail to start them)."""
    return 4 * (os.cpu_count() or 1)


def threads(text: str) -> int:
    """An argparse ``type``: a thread count from 1 to :func:`max_threads`."""
    value = _integer(text)
    if not 1 <= value <= max_threads():
        raise argparse.ArgumentTypeError(f"must be >= 1 and at most {max_threads()} (four per CPU core of this "
                                         f"machine), got {value}")
    return value


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads, default=DEFAULT_THREADS,
                   help="torch.set_num_threads: CPU threads per process (one is the fastest for these small models, "
                        "five times faster than two on a busy 2-core machine; see examples/gan/README.md)")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (anything else is an argparse error naming the value)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def learning_rate(text: str) -> float:
    """An argparse ``type``: a finite learning rate > 0 (an infinite one used to be taken, and the run stopped
    as "diverged" at its first iteration)."""
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"learning rates must be > 0 and finite, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (e.g. ``--weight-std``; infinity used to end in a traceback)."""
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def control_steps(text: str) -> int:
    """An argparse ``type``: the committed discriminator steps per iteration of a control, >= 2 (one is the plain
    GAN's)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a control commits >= 2 D steps per iteration (1 is the plain GAN, "
                                         f"K = 0), got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number (e.g. an extrapolation factor)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse ``type``: a seed torch's generators take, 0 <= seed < 2**64."""
    value = _integer(text)
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64) (a torch generator seed), got {value}")
    return value


def folder(text: str) -> str:
    """An output folder: any non-empty path (an empty one would write into the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return text


def physical_memory() -> int:
    """This machine's physical memory in bytes (0 where the platform does not tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 0


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def sized(bytes_each: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer whose memory, at least ``bytes_each`` bytes per unit (a lower bound;
    ``what`` names the unit and what it holds), fits in this machine's physical memory (its lower limit is the
    configuration's to check). A size of 10**9 used to start the run and end in an allocator traceback after
    work had begun."""
    def parse(text: str) -> int:
        value = _integer(text)
        need, have = max(value, 0) * bytes_each, physical_memory()
        if have and need > have:
            raise argparse.ArgumentTypeError(
                f"{value:,} needs at least {_bytes(need)} of memory ({_bytes(bytes_each)} per {what}), more than "
                f"this machine's {_bytes(have)}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages ("invalid int value")
    return parse


# ------------------------------------------------------------------ configurations from one source

Config = TypeVar("Config")


def option(default: Any, help: str, *, type: Optional[Callable[[str], Any]] = None,
           choices: Optional[Sequence[Any]] = None, metavar: Optional[str] = None) -> Any:
    """A dataclass field whose default, help text, argparse ``type`` (a validator such as :func:`learning_rate`;
    without one, the field's annotation), ``choices`` and ``metavar`` (the value's name in ``--help``) sit next to
    it, for :func:`add_config_flags`. A ``Tuple[X, ...]`` field takes one or more values (``type`` validates each)."""
    metadata: Dict[str, Any] = {"help": help}
    if type is not None:
        metadata["type"] = type
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    """``weight_std`` -> ``--weight-std`` (argparse turns the flag back into the field name as its ``dest``)."""
    return "--" + field_name.replace("_", "-")


def _value_type(hint: Any) -> Any:
    """``Optional[X]`` -> ``X``; anything else unchanged."""
    if get_origin(hint) in (Union, types.UnionType):
        kinds = [kind for kind in get_args(hint) if kind is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def as_typed(value: Any) -> str:
    """A flag's value as it is typed on the command line: a tuple's items separated by spaces (``0 1 5``), anything
    else as ``str``."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _item_type(hint: Any) -> Any:
    """``Tuple[X, ...]`` -> ``X`` (a field of one or more values); None for any other annotation."""
    args = get_args(hint)
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _config_fields(config: Any) -> List[dataclasses.Field[Any]]:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a dataclass instance (a configuration), got {config!r}")
    return [f for f in dataclasses.fields(config) if f.init]


def add_config_flags(parser: argparse.ArgumentParser, defaults: Any, *,
                     presets: Optional[Mapping[str, Any]] = None, only: Optional[Sequence[str]] = None,
                     exclude: Sequence[str] = (), helps: Optional[Mapping[str, str]] = None,
                     title: Optional[str] = None) -> None:
    """One flag per field of the dataclass instance ``defaults`` (those in ``only``, all by default, less
    ``exclude``), in field order: the name from :func:`flag_name`, the default from ``defaults``, the help text,
    ``type`` and ``choices`` from the field's metadata (:func:`option`; ``helps`` overrides a help text for this
    script), the type otherwise from the annotation (``Optional[X]`` -> ``X``). A ``bool`` field is a switch:
    ``--name`` when its default is off, ``--name`` / ``--no-name`` when on.

    ``presets`` (name -> configuration, ``defaults`` among them) leaves the default of a field on which they
    disagree unset (argparse's ``SUPPRESS``: the flag is in the parsed namespace only when given) and names each
    preset's value in the help; :func:`config_from_args` then starts from the chosen preset. A field without help
    text, or a name in ``only`` / ``exclude`` that is not a field, is a ``ValueError``."""
    fields = _config_fields(defaults)
    kind = type(defaults).__name__
    names = [f.name for f in fields]
    unknown = sorted((set(only or ()) | set(exclude) | set(helps or {})) - set(names))
    if unknown:
        raise ValueError(f"{kind} has no field(s) {', '.join(unknown)}")
    hints = get_type_hints(type(defaults))
    target: Any = parser if title is None else parser.add_argument_group(title)
    for f in fields:
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        text = (helps or {}).get(f.name, f.metadata.get("help"))
        if not text:
            raise ValueError(f"{kind}.{f.name} has no help text: declare it with cli.option(default, help)")
        default = getattr(defaults, f.name)
        kwargs: Dict[str, Any] = {"dest": f.name, "default": default, "help": text.replace("%", "%%")}
        by_preset = {name: getattr(preset, f.name) for name, preset in (presets or {}).items()}
        if any(value != default for value in by_preset.values()):
            kwargs["default"] = argparse.SUPPRESS
            shown = ", ".join(f"{name} {as_typed(value)}" for name, value in by_preset.items())
            kwargs["help"] += f" (default by preset: {shown})".replace("%", "%%")
        value_type = _value_type(hints[f.name])
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        if value_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            item_type = _item_type(value_type)
            if item_type is not None:  # parsed as a list; config_from_args makes it the field's tuple
                kwargs["nargs"] = "+"
                value_type = item_type
                if kwargs["default"] is not argparse.SUPPRESS and "default" not in text:
                    kwargs["help"] += f" (default: {as_typed(default)})".replace("%", "%%")
            kwargs["type"] = f.metadata.get("type", value_type)
            if not callable(kwargs["type"]):
                raise ValueError(f"{kind}.{f.name}: give its argparse type in cli.option (annotation {value_type})")
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        target.add_argument(flag_name(f.name), **kwargs)


def config_from_args(args: argparse.Namespace, base: Config, *, only: Optional[Sequence[str]] = None) -> Config:
    """``base`` with every field that the parsed ``args`` hold (the flags of :func:`add_config_flags`) replaced
    by its parsed value; the fields without a flag, or whose flag was not given and has no default, keep
    ``base``'s value. ``only`` (the ``only`` given to :func:`add_config_flags`) takes those fields alone: a
    script's own flag that shares a field's name (a list of controls named ``--control``) is not the field's.
    Nothing is validated here: that is the configuration's own job."""
    given = vars(args)
    names = [f.name for f in _config_fields(base)]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ValueError(f"{type(base).__name__} has no field(s) {', '.join(unknown)}")
    return dataclasses.replace(base, **{name: tuple(given[name]) if isinstance(given[name], list)  # nargs
                                        else given[name]
                                        for name in names
                                        if name in given and (only is None or name in only)})  # type: ignore[type-var]


def changed_fields(config: Any, base: Any) -> Dict[str, Any]:
    """The fields of ``config`` whose values differ from ``base``'s, in field order (a preset, in words)."""
    return {f.name: getattr(config, f.name) for f in _config_fields(config)
            if getattr(config, f.name) != getattr(base, f.name)}
