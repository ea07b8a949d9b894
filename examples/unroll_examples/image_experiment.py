"""What the image experiment scripts (``mnist_rnn.py``, ``stacked_mnist.py``, ``colored_mnist.py``,
``cifar10.py``) share around :mod:`image_training`: their settings (:class:`ImageConfig`, one flag per field; each
script's presets at its top, the reduced one by default, ``--paper`` for the paper's, explicit flags over both;
``--help`` shows each default), validation before any work, the run folder
(:func:`session`: lock, ``--resume`` and the stored settings, through :mod:`runs`), the deviations from the paper,
tables, and the outputs every script writes (``results.json``, the figures and, with ``--per-seed FILE``, each run's
final numbers in a small file to commit beside a results page: :func:`per_seed_record`), and the results page made
from that file through :mod:`report` (``--doc PAGE``; ``--report-only`` remakes it from the file alone, training
nothing: :class:`PageSpec`, :func:`read_per_seed`, :func:`write_page`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import torch

from . import REPO_ROOT, cli, report, runs
from . import parallel as data_parallel
from .cli import HelpFormatter, add_threads_flag
from .image_models import parse_size, size_label
from .image_training import (
    G_LOSSES,
    MAY_CHANGE,
    RESULT,
    Evaluate,
    GANConfig,
    GANTrainer,
    ImageGAN,
    RunSpec,
    run_experiment,
)
from .mnist_data import DatasetError
from .plotting import plot_loss_curves, plot_sample_panels, plot_samples_over_training
from .runs import CHECKPOINT
from .timing import interleaved_seconds, matched_count

T = TypeVar("T")

# The reduced defaults of the conv experiments (Stacked MNIST, colored MNIST, CIFAR-10) train D and G at this rate:
# at App. D's 2e-4 / 1e-4 their generators still output noise at the end of a CPU-sized budget (1,200-1,500
# iterations), while at 1e-3 they draw digits within it (docs/results/stacked_mnist.md, colored_mnist.md).
REDUCED_LR = 1e-3
LR_NOTE = ("learning rates: D {d_lr}, G {g_lr}; App. D's are 2e-4 and 1e-4, and the reduced default uses 1e-3 "
           "for both because at App. D's rates these generators still output noise after 1,200-1,500 iterations")
# Settings that do not change the numbers: never compared on --resume.
NOT_COMPARED = ("out",)
# --per-seed: lists of at most this many scalars are kept in a run's entry (RGB colour means, distance
# quartiles); longer ones (loss curves, histograms, per-target errors) are left out.
PER_SEED_MAX_LIST = 8
# --per-seed: record fields left out although scalar: timings (they differ between any two runs) and the
# divergence message, which names the checkpoint's path (``diverged_at`` keeps its iteration).
PER_SEED_DROPPED = ("train_seconds", "seconds_per_iteration", "eval_seconds", "error")


# Lower bounds of the memory of one unit of an image size flag (float32), for cli.sized: the smallest images here
# are MNIST's 28 x 28.
_IMAGE_BYTES = 4 * 28 * 28
BATCH = cli.sized(_IMAGE_BYTES, "image")
"""argparse type of ``--batch`` and the scripts' sample counts (``--eval-samples``, ``--js-samples``)."""
UNROLLED_STEPS = cli.sized(2 * _IMAGE_BYTES, "unrolled step, which keeps D's activations of at least 2 images")


# ------------------------------------------------------------------------------------ table rows
# A run's row: K unrolled steps (its key and record hold "K"), a control that commits d_steps D steps per iteration
# and takes the plain gradient (also "d_steps", with K = 0), or one unrolled step extrapolated by alpha (also
# "alpha", with K = 1). The row fields besides K, absent from the runs of the K rows:
ROW_FIELDS = ("d_steps", "alpha")
Row = Tuple[int, int, Optional[float]]  # (K, d_steps, alpha)


def setting_rows(settings: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The rows of ``settings`` as run keys: ``{"K": K}`` per K, ``{"K": 0, "d_steps": n}`` per control and
    ``{"K": 1, "alpha": a}`` per alpha (settings without ``controls`` or ``alphas`` have none)."""
    return ([{"K": K} for K in settings["K"]]
            + [{"K": 0, "d_steps": n} for n in settings.get("controls", ())]
            + [{"K": 1, "alpha": a} for a in settings.get("alphas", ())])


def row_of(entry: Mapping[str, Any]) -> Row:
    """The row of a run's key or record."""
    return entry["K"], entry.get("d_steps", 1), entry.get("alpha")


def row_label(entry: Mapping[str, Any]) -> str:
    """How tables name a row: ``K = 5``, ``16 D steps`` or ``α = 5 (K = 1)``."""
    K, d_steps, alpha = row_of(entry)
    if alpha is not None:
        return f"α = {alpha:g} (K = 1)"
    return f"{d_steps} D steps" if d_steps > 1 else f"K = {K}"


# ------------------------------------------------------------------------------------ tables


def aggregate(records: Sequence[Mapping[str, Any]], key_names: Sequence[str], metrics: Sequence[str]
              ) -> List[Dict[str, Any]]:
    """One row per table cell (the values of ``key_names``, in first-seen order): mean and s.e. over seeds of
    each metric of the finished runs (:func:`report.mean_and_se`: no s.e. for one run), and how many runs
    finished or diverged."""
    cells: Dict[Tuple, List[Mapping[str, Any]]] = {}
    for record in records:
        cells.setdefault(tuple(record.get(k) for k in key_names), []).append(record)
    rows = []
    for key, group in cells.items():
        done = [r for r in group if r.get("status") == "done"]
        row: Dict[str, Any] = {**dict(zip(key_names, key)), "runs": len(done),
                               "diverged": len(group) - len(done)}
        for metric in metrics:
            row[metric], row[f"{metric}_se"] = report.mean_and_se([r[metric] for r in done if metric in r])
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str]],
                   paper: Optional[Mapping[Tuple, str]] = None, key_names: Sequence[str] = ()) -> str:
    """``columns`` are ``(metric, header)``; cells show ``mean ± s.e.`` (the mean alone for one run). ``paper``
    maps a row's key tuple to the published entry, shown in a last column."""
    headers = list(key_names) + [h for _, h in columns] + ["runs"] + (["paper"] if paper is not None else [])
    body = []
    for row in rows:
        cells = ["—" if row[k] is None else str(row[k]) for k in key_names]
        for metric, _ in columns:
            mean, se = row[metric], row[f"{metric}_se"]
            cells.append("—" if math.isnan(mean) else report.plus_minus(mean, se, ".4g", ".2g"))
        cells.append(f"{row['runs']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else ""))
        if paper is not None:
            cells.append(paper.get(tuple(row[k] for k in key_names), "—"))
        body.append(cells)
    return report.table(body, headers)


# ------------------------------------------------------------------------------ shared flags and config


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that do not change the numbers: where the data is, how the runs are carried out, what else is
    written."""
    p.add_argument("--data-dir", default=None,
                   help="folder with the dataset files (default: $UNROLL_MNIST_DIR / $UNROLL_CIFAR10_DIR, else "
                        "../shared/data/<name> beside the repository, else data/<name> where downloads go)")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs in --out from their checkpoints (the same settings; --steps may grow)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_threads_flag(p)
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in its own process with --threads threads (default: one per CPU "
                        "core for --device cpu where processes can fork, else 1); the numbers do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--per-seed", type=Path, default=None, metavar="FILE",
                   help="also write every run's final numbers (no loss curves or snapshots) to FILE, a small JSON "
                        "meant to be committed beside a results page, e.g. docs/results/stacked_mnist/"
                        "per_seed.json; a rerun of the same command on the same machine writes the same bytes "
                        "(default: none)")
    p.add_argument("--doc", type=Path, default=None, metavar="PAGE",
                   help="also write the results page PAGE from the per-seed numbers (their file: --per-seed, by "
                        "default PAGE's folder/per_seed.json), keeping its hand-written blocks; with --report-only "
                        "the default is docs/results/<experiment>.md (default: no page)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: remake the results page --doc from the per-seed file --per-seed (default "
                        "docs/results/<experiment>/per_seed.json), which is checked first; settings flags are "
                        "ignored, the numbers and the command come from the file")


def check_per_seed_path(path: Path) -> Optional[str]:
    """Why ``--per-seed`` cannot be written to ``path`` (None when it can): it must end in ``.json``, not be a
    folder, and its parent folder must exist or be creatable (the nearest existing ancestor a writable folder).
    Nothing is created."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return f"--per-seed {path}: the file name must end in .json"
    if path.is_dir():
        return f"--per-seed {path}: is a folder; name a .json file"
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"--per-seed {path}: its folder cannot be created ({ancestor} is a file)"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"--per-seed {path}: its folder cannot be written ({ancestor} is not writable)"
    return None


DIVERSITY_SETTINGS = ("targets", "restarts", "lbfgs_iters", "pairs")
DIVERSITY_AT_LEAST = {name: 1 for name in DIVERSITY_SETTINGS}


def size_arg(text: str) -> str:
    """argparse type for a size multiplier: ``"0.25"`` or ``"1/4"`` -> ``"1/4"``."""
    try:
        return size_label(parse_size(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


@dataclass(frozen=True)
class ImageConfig:
    """Every setting an image experiment's numbers depend on, and its output folder: one flag each, of the field's
    name (``d_lr`` -> ``--d-lr``, :func:`cli.add_config_flags`). A script uses some of the fields (its
    ``SETTINGS``, in the order ``settings.json`` and ``results.json`` store them) and names its presets at its top
    (``CONFIGS["reduced"]``, the default, and ``CONFIGS["paper"]``, ``--paper``); the defaults here are App. D's
    training settings where the paper states them, else common values of the scripts."""

    K: Tuple[int, ...] = cli.option((0, 1, 5, 10), "unrolled discriminator steps", type=UNROLLED_STEPS,
                                    metavar="K")
    sizes: Tuple[str, ...] = cli.option(("1/4",), "discriminator size multipliers", type=size_arg, metavar="X")
    size: str = cli.option("1/4", "model size multiplier X", type=size_arg)
    seeds: Tuple[int, ...] = cli.option((0, 1, 2), "seeds", type=cli.seed, metavar="S")
    steps: int = cli.option(50_000, "training iterations, one D and one G update each", type=int)
    eval_samples: int = cli.option(2_000, "generator samples evaluated per run", type=BATCH)
    js_samples: int = cli.option(5_000, "Monte Carlo draws per KDE for the JS divergence", type=BATCH)
    batch: int = cli.option(64, "minibatch size", type=BATCH)
    d_lr: float = cli.option(2e-4, "discriminator Adam learning rate", type=cli.learning_rate)
    g_lr: float = cli.option(1e-4, "generator Adam learning rate", type=cli.learning_rate)
    unroll_lr: Optional[float] = cli.option(
        None, "learning rate of the K look-ahead Adam steps (default: the discriminator's, as the paper)",
        type=cli.learning_rate)
    controls: Tuple[int, ...] = cli.option(
        (), "control rows: committed D steps per iteration (K = 0), one row each", type=cli.control_steps, metavar="N")
    alphas: Tuple[float, ...] = cli.option(
        (), "extrapolation rows: one unrolled step extrapolated by alpha (K = 1), one row each", type=cli.finite_float,
        metavar="A")
    beta1: float = cli.option(0.5, "Adam beta1 of both players", type=float)
    g_loss: str = cli.option("nonsaturating", "nonsaturating: -log D(G(z)); minimax: G maximises L_D",
                             choices=G_LOSSES)
    targets: int = cli.option(64, "images reconstructed by inference via optimisation", type=int)
    restarts: int = cli.option(3, "L-BFGS random restarts per target", type=int)
    lbfgs_iters: int = cli.option(50, "L-BFGS iterations per restart", type=int)
    pairs: int = cli.option(5_000, "random pairs for the distance histograms", type=int)
    snapshot_every: int = cli.option(150, "iterations between sample-grid snapshots", type=int)
    checkpoint_every: int = cli.option(50, "iterations between checkpoints", type=int)
    split: str = cli.option("auto", "MNIST split to train on (auto: train if present or downloadable, else test)",
                            choices=("auto", "train", "test"))
    no_checksum: bool = cli.option(False, "skip the official md5 check of the batch files (for your own "
                                          "conversions)")
    out: str = cli.option("runs/image", "output folder", type=cli.folder)

    def __post_init__(self) -> None:
        # Lists (e.g. from JSON) as the tuples the presets compare with.
        for name in ("K", "sizes", "seeds", "controls", "alphas"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


def settings_of(config: ImageConfig, names: Sequence[str]) -> Dict[str, Any]:
    """The fields ``names`` of ``config`` (a script's ``SETTINGS``), in that order, tuples as lists: the settings
    that ``results.json`` and ``settings.json`` store, that ``--resume`` compares and that the notes name."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in ((name, getattr(config, name)) for name in names)}


def config_parser(description: str, configs: Mapping[str, ImageConfig], names: Sequence[str],
                  helps: Optional[Mapping[str, str]] = None) -> argparse.ArgumentParser:
    """An argument parser with one flag per setting ``names`` of :class:`ImageConfig` (``helps``: this script's
    words for some), whose default is the ``"reduced"`` preset's or, where the presets differ, the chosen one's
    (``--paper``: ``"paper"``; the help names both), and the flags that do not change the numbers."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    reduced, paper = configs["reduced"], configs["paper"]
    differ = [name for name in names if getattr(paper, name) != getattr(reduced, name)]
    p.add_argument("--paper", action="store_true",
                   help="the paper preset, as if given " + " ".join(
                       f"{cli.flag_name(name)} {cli.as_typed(getattr(paper, name))}" for name in differ)
                        + " (explicit flags still override it)")
    cli.add_config_flags(p, reduced, presets=configs, only=names, helps=helps,
                         title="settings (unroll_examples/image_experiment.py ImageConfig; the reduced preset unless "
                               "--paper)")
    add_run_flags(p)
    return p


def parse_config(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], configs: Mapping[str, ImageConfig],
                 names: Sequence[str], at_least: Mapping[str, int] = {}
                 ) -> Tuple[argparse.Namespace, ImageConfig, Dict[str, Any], Path]:
    """Parse and validate every flag of :func:`config_parser` (``at_least``: minimum values of settings): any
    problem is an argparse error before any work starts. Returns ``(args, config, settings, out)``, ``settings``
    being :func:`settings_of` the effective ``config``; nothing is written."""
    args = p.parse_args(argv)
    config = cli.config_from_args(args, configs["paper" if args.paper else "reduced"])
    settings = settings_of(config, names)
    check_args(p, args, settings, at_least)
    return args, config, settings, Path(config.out)


def make_config(settings: Mapping[str, Any], K: int, seed: int, d_steps: int = 1,
                alpha: Optional[float] = None) -> GANConfig:
    """The :class:`GANConfig` of one run (a row of :func:`setting_rows`) from a script's resolved settings."""
    return GANConfig(K=K, d_steps=d_steps, alpha=alpha, steps=settings["steps"], batch=settings["batch"],
                     d_lr=settings["d_lr"], g_lr=settings["g_lr"], unroll_lr=settings["unroll_lr"],
                     beta1=settings["beta1"], g_loss=settings["g_loss"], seed=seed,
                     snapshot_every=settings["snapshot_every"],
                     checkpoint_every=settings["checkpoint_every"])


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, settings: Mapping[str, Any],
               at_least: Mapping[str, int] = {}) -> None:
    """Every check of the parsed flags and settings that argparse's types cannot make (distinct K and seeds,
    ``at_least``, each run's :class:`GANConfig`, the device, ``--per-seed``, ``--workers``): a problem is
    ``p.error``. Fills in ``args.workers``."""
    for name in ("K", "seeds", "controls", "alphas"):
        values = list(settings.get(name, ()))
        if len(set(values)) != len(values):
            p.error(f"--{name} values must be distinct, got {values}")
    for name, minimum in at_least.items():
        if settings[name] < minimum:
            p.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {settings[name]}")
    try:
        for row in setting_rows(settings):
            for seed in settings["seeds"]:
                make_config(settings, seed=seed, **row).validate()
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as error:
        p.error(str(error))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.per_seed is not None and not args.report_only:
        problem = check_per_seed_path(args.per_seed)
        if problem:
            p.error(problem)
    if data_parallel.world_size() > 1 and args.workers not in (None, 1):
        p.error(f"--workers {args.workers}: under torchrun every rank is one process training every run on its "
                f"shard of each minibatch; use --workers 1")
    if args.workers is None:
        args.workers = 1 if data_parallel.world_size() > 1 else default_workers(device)
    elif args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    elif args.workers > 1 and not can_run_in_workers(device):
        p.error(f"--workers {args.workers}: parallel runs need --device cpu and a platform that can fork "
                f"processes (Linux); use --workers 1")


@contextlib.contextmanager
def session(args: argparse.Namespace, settings: Mapping[str, Any], out: Path,
            extra: Optional[Mapping[str, Any]] = None,
            parallel: Optional[data_parallel.DataParallel] = None) -> Iterator[float]:
    """The script's hold on ``out`` (:func:`runs.claim`; under ``torchrun`` rank 0's, :func:`parallel.claim`): the
    settings that make the numbers (``settings`` and ``extra``, e.g. the classifier's) are stored, and on
    ``--resume`` must match, but for ``--steps`` and ``--checkpoint-every``; sets the thread count; yields the
    start time."""
    stored = {**{k: v for k, v in settings.items() if k not in NOT_COMPARED}, **(extra or {})}
    with data_parallel.claim(out, parallel, resume=args.resume, settings=stored, may_change=MAY_CHANGE):
        torch.set_num_threads(args.threads)
        yield time.perf_counter()


def run_specs(gan: ImageGAN, settings: Mapping[str, Any], **key: Any) -> List[RunSpec]:
    """One run per row (:func:`setting_rows`) and seed of ``settings``, in its table cell ``{**key, **row}``."""
    return [RunSpec(gan, make_config(settings, seed=seed, **row), {**key, **row})
            for row in setting_rows(settings) for seed in settings["seeds"]]


def row_seconds(specs: Sequence[RunSpec], iterations: int, rounds: int, device: str = "cpu") -> Dict[str, float]:
    """Seconds per training iteration of each run of ``specs``, by folder: fresh in-memory trainers (the cost of an
    iteration does not depend on the weights) timed side by side in this process
    (:func:`timing.interleaved_seconds`)."""
    def iteration(trainer: GANTrainer) -> Callable[[], None]:
        def step() -> None:
            trainer.train_step()
        return step

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    steps = {spec.folder: iteration(GANTrainer(spec.gan, spec.cfg, device=device)) for spec in specs}
    return interleaved_seconds(steps, iterations, rounds, synchronize=sync)


def match_cost(gan: ImageGAN, settings: Mapping[str, Any], candidates: Sequence[int], iterations: int, rounds: int,
               device: str = "cpu") -> Dict[str, Any]:
    """The cost-matched control of every row of ``settings`` that looks ahead (K > 0, or an alpha): the committed
    D steps per iteration whose measured cost equals the row's. The rows are timed beside controls of
    ``candidates`` D steps (:func:`row_seconds`, the first seed's models); a least-squares line through the
    candidates' costs gives the matched count (:func:`timing.matched_count`), and each matched control is then
    timed again beside its row, for the ratio it reaches."""
    rows = [timing_spec(gan, settings, row) for row in setting_rows(settings) if row_of(row)[0] > 0]
    probes = {n: timing_spec(gan, settings, {"K": 0, "d_steps": n}) for n in candidates}
    costs = row_seconds([*rows, *probes.values()], iterations, rounds, device)
    line = {n: costs[probes[n].folder] for n in candidates}
    matched = {row.folder: matched_count(line, costs[row.folder]) for row in rows}
    controls = {n: timing_spec(gan, settings, {"K": 0, "d_steps": n}) for n in sorted(set(matched.values()))}
    check = row_seconds([*rows, *controls.values()], iterations, rounds, device)
    return {
        "candidates": {str(n): round(seconds, 5) for n, seconds in line.items()},
        "rows": {row_label(row.key): {
            "seconds": round(check[row.folder], 5), "matched_d_steps": matched[row.folder],
            "control_seconds": round(check[controls[matched[row.folder]].folder], 5),
            "ratio": round(check[row.folder] / check[controls[matched[row.folder]].folder], 3)} for row in rows},
        "timing": {"iterations": iterations, "rounds": rounds, "seed": settings["seeds"][0], "device": device},
    }


def timing_spec(gan: ImageGAN, settings: Mapping[str, Any], row: Mapping[str, Any]) -> RunSpec:
    """The run of ``row`` that the cost timings use: the first seed's (the models' sizes do not depend on it)."""
    return RunSpec(gan, make_config(settings, seed=settings["seeds"][0], **row), dict(row))


def row_costs(gan: ImageGAN, settings: Mapping[str, Any], iterations: int, rounds: int, device: str = "cpu"
              ) -> Dict[str, float]:
    """Seconds per iteration of every row of ``settings``, by :func:`row_label`, timed side by side
    (:func:`row_seconds`)."""
    specs = [timing_spec(gan, settings, row) for row in setting_rows(settings)]
    seconds = row_seconds(specs, iterations, rounds, device)
    return {row_label(spec.key): round(seconds[spec.folder], 5) for spec in specs}


def uniform_sampler(images: torch.Tensor) -> Callable[[int, torch.Generator], torch.Tensor]:
    """``sample(n, generator)``: ``n`` rows of ``images`` drawn uniformly with replacement."""
    def sample(n: int, gen: torch.Generator) -> torch.Tensor:
        return images[torch.randint(images.shape[0], (n,), generator=gen)]

    return sample


def run(args: argparse.Namespace, specs: Sequence[RunSpec], out: Path, evaluate: Evaluate,
        eval_settings: Mapping[str, Any], parallel: Optional[data_parallel.DataParallel] = None
        ) -> Tuple[List[Dict[str, Any]], Dict[str, GANTrainer]]:
    """:func:`image_training.run_experiment` with the script's flags (resume, device, progress, workers) and,
    under ``torchrun``, the data-parallel job."""
    return run_experiment(specs, out, evaluate, args.resume, args.device, not args.no_progress,
                          workers=args.workers, eval_settings=eval_settings, parallel=parallel)


def load_data(loader: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``loader(*args, **kwargs)``, its dataset errors (files missing and not downloadable, bad checksums) turned
    into a :class:`runs.RunError`: one line, exit code 2."""
    try:
        return loader(*args, **kwargs)
    except DatasetError as error:
        raise runs.RunError(str(error)) from None


def eval_settings(settings: Mapping[str, Any], names: Sequence[str], **extra: Any) -> Dict[str, Any]:
    """What a run's evaluation depends on besides its training: ``names`` from ``settings`` and ``extra``."""
    return {**{name: settings[name] for name in names}, **extra}


def can_run_in_workers(device: torch.device) -> bool:
    """Whether runs on ``device`` can be trained in forked worker processes: CPU runs where processes can fork."""
    return device.type == "cpu" and runs.can_fork()


def default_workers(device: torch.device) -> int:
    """One worker per CPU core available to this process where :func:`can_run_in_workers`, else 1."""
    if not can_run_in_workers(device):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def deviations(settings: Mapping[str, Any], paper: Mapping[str, Any], notes: Iterable[str]) -> List[str]:
    """Every setting that differs from the paper, then the fixed ``notes`` (unstated or changed details), in
    which ``{name}`` is replaced by the setting's value."""
    lines = [f"{name}: {settings[name]} (paper: {paper[name]})" for name in paper
             if _normalise(settings.get(name)) != _normalise(paper[name])]
    return lines + [note.format(**settings) for note in notes]


def paper_deviations(config: ImageConfig, paper: ImageConfig, stated: Sequence[str], notes: Iterable[str]
                     ) -> List[str]:
    """:func:`deviations` of ``config`` from the paper preset: a line for each setting the paper states
    (``stated``, in that order) on which they differ, then the ``notes``, formatted with ``config``'s fields."""
    every = [f.name for f in dataclasses.fields(config)]
    return deviations(settings_of(config, every), settings_of(paper, stated), notes)


def _normalise(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)


def environment() -> Dict[str, Any]:
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}


def announce(title: str, settings: Mapping[str, Any], notes: Sequence[str], log: Callable[[str], None]) -> None:
    log(f"{title}")
    log("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    log("deviations from the paper (and details it leaves open):")
    for line in notes:
        log(f"  - {line}")


# ------------------------------------------------------------------------------------------- outputs


def first_finished(specs: Sequence[RunSpec], trainers: Mapping[str, GANTrainer]
                   ) -> Dict[str, Tuple[RunSpec, GANTrainer]]:
    """The first finished run (lowest listed seed) of every table cell, keyed by its label; for figures."""
    first: Dict[str, Tuple[RunSpec, GANTrainer]] = {}
    for spec in specs:
        if spec.folder in trainers and spec.label not in first:
            first[spec.label] = (spec, trainers[spec.folder])
    return first


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def per_seed_record(record: Mapping[str, Any]) -> Dict[str, Any]:
    """One run's entry of the ``--per-seed`` file: its identifying fields (run, table-cell keys such as K and X,
    seed, status, step, diverged_at) and final metrics, by one rule for every script: keep a field whose value is
    a scalar (number, string, bool, null) or a list of at most :data:`PER_SEED_MAX_LIST` scalars; leave out
    mappings (the run's ``config`` and ``eval_settings``, which the file's ``settings`` and ``eval_settings``
    hold), longer lists (loss curves, histograms, per-target errors) and :data:`PER_SEED_DROPPED` (timings and the
    divergence message with its path), so a rerun gives the same entry."""
    kept: Dict[str, Any] = {}
    for key, value in record.items():
        if key in PER_SEED_DROPPED:
            continue
        if _is_scalar(value) or (isinstance(value, (list, tuple)) and len(value) <= PER_SEED_MAX_LIST
                                 and all(_is_scalar(v) for v in value)):
            kept[key] = list(value) if isinstance(value, tuple) else value
    return kept


def per_seed_payload(name: str, command: str, settings: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                     summary: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What ``--per-seed`` writes: the experiment, the command, the settings, the evaluation settings the runs
    share (when they all have the same), every run's :func:`per_seed_record`, in the order the runs were
    listed, and ``summary`` when given (numbers of the whole experiment that no single run has, e.g. Table 3's
    percent best rank, which compares the runs target by target). No wall time, environment or timestamp:
    rerunning the command on the same machine and torch build writes the same bytes (across CPUs the numbers
    themselves can differ: examples/gan/README.md, *Same numbers*)."""
    payload: Dict[str, Any] = {"experiment": name, "command": command, "settings": dict(settings)}
    shared = [r.get("eval_settings") for r in records]
    if records and shared[0] is not None and all(s == shared[0] for s in shared):
        payload["eval_settings"] = shared[0]
    payload["runs"] = [per_seed_record(r) for r in records]
    if summary is not None:
        payload["summary"] = dict(summary)
    return payload


def finish(out: Path, name: str, argv: Optional[Sequence[str]], settings: Mapping[str, Any], notes: Sequence[str],
           records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], table: str,
           trainers: Mapping[str, GANTrainer], specs: Sequence[RunSpec], start: float,
           extra: Optional[Mapping[str, Any]] = None, log: Callable[[str], None] = print,
           per_seed: Optional[Path] = None, summary: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Write ``results.json`` and the figures every script has, and print the table and the deviations.

    Figures: ``samples.png`` (final samples of each table cell's first finished seed), ``samples_over_training.png``
    (Fig. 3-style rows per cell) and ``losses.png``. With ``per_seed`` (the script's ``--per-seed``), also every
    run's final numbers there, with ``summary`` (:func:`per_seed_payload`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = first_finished(specs, trainers)
    if first:
        rows_over_time = [(f"{label}, seed {spec.cfg.seed}", trainer.snapshots)
                          for label, (spec, trainer) in first.items()]
        plot_samples_over_training(rows_over_time, out / "samples_over_training.png",
                                   title=f"{name}: samples of fixed latents over training (iterations)")
        plot_sample_panels([(f"{label} (seed {spec.cfg.seed})", trainer.snapshots[-1][1])
                            for label, (spec, trainer) in first.items()], out / "samples.png",
                           title=f"{name}: samples after {settings['steps']} iterations")
    plot_loss_curves(records, out / "losses.png", title=name)
    payload = {
        "experiment": name, "command": " ".join([f"python examples/gan/{name}.py", *argv]),
        "status": "done" if all(r["status"] == "done" for r in records)
        else "all runs diverged" if not any(r["status"] == "done" for r in records) else "some runs diverged",
        "settings": dict(settings), "deviations": list(notes), **(extra or {}), "table": list(rows),
        "table_markdown": table, "runs": list(records), "environment": environment(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    runs.write_json(out / "results.json", payload)
    if per_seed is not None:
        runs.write_json(Path(per_seed), per_seed_payload(name, payload["command"], settings, records, summary))
    log("")
    log(table)
    log("")
    log("deviations from the paper:")
    for line in notes:
        log(f"  - {line}")
    diverged = [r["run"] for r in records if r["status"] != "done"]
    if diverged:
        log(f"diverged runs (last good checkpoints kept): {', '.join(diverged)}")
    figures = ", ".join(sorted(path.name for path in Path(out).glob("*.png")))
    log(f"outputs in {out}: results.json, {figures}; per run: <run>/{CHECKPOINT}, <run>/{RESULT}")
    if per_seed is not None:
        log(f"per-seed numbers: {per_seed}")
    log(f"wall time {payload['wall_seconds']:.0f} s")
    return payload


def split_note(mnist: Any, also: str = "") -> List[str]:
    """A first deviation when the digits are not MNIST's training split, which the paper trains on."""
    if mnist.split == "train":
        return []
    return [f"data: the {mnist.description} (the training split is not available); the paper trains on the "
            f"training split{also}"]


# ------------------------------------------------------------------------------------------- results pages

RESULTS_DIR = REPO_ROOT / "docs" / "results"
"""Where the committed results pages are (``<experiment>.md``, its figures and ``<experiment>/per_seed.json``)."""
# A per-seed file is a few kB; anything far larger is not one (and is not read into memory).
PER_SEED_MAX_BYTES = 4 * 2**20
RUN_STATUSES = ("done", "diverged")


class PerSeedError(report.NumbersFileError):
    """A per-seed file that cannot be a results page's numbers: reported as one line, before anything is
    written."""


@dataclass(frozen=True)
class PageSpec:
    """What a script's results page is made of besides the per-seed numbers.

    ``keys`` are the fields that place a run in its table cell besides K and the seed (``{"X": str}``), ``metrics``
    the numbers every finished run has; ``figures`` are ``(file name, alt text)`` in the run folder and beside the
    page (the first opens the page, :func:`report.opening`); ``body(payload, doc)`` renders the tables;
    ``check_summary(summary)`` says what is wrong with the file's ``summary`` (None when nothing is),
    ``about`` is the text a new page starts its hand-written block with, and ``subtitle(settings)`` what the title
    adds for the settings of a page (e.g. its controls)."""

    name: str
    title: str
    keys: Mapping[str, type]
    metrics: Tuple[str, ...]
    figures: Tuple[Tuple[str, str], ...]
    body: Callable[[Mapping[str, Any], Path], List[str]]
    check_summary: Optional[Callable[[Any], Optional[str]]] = None
    about: str = ""
    subtitle: Optional[Callable[[Mapping[str, Any]], str]] = None

    @property
    def program(self) -> str:
        return f"examples/gan/{self.name}.py"


def paragraph(text: Optional[str], index: int) -> str:
    """Paragraph ``index`` of ``text`` (a script's docstring; empty under ``python -OO``, which drops them)."""
    paragraphs = (text or "").split("\n\n")
    return paragraphs[index] if index < len(paragraphs) else ""


def default_page(name: str) -> Path:
    return RESULTS_DIR / f"{name}.md"


def page_per_seed_file(doc: Path) -> Path:
    """The per-seed file of the page ``doc``: ``per_seed.json`` in the folder of the page's name."""
    return Path(doc).with_suffix("") / "per_seed.json"


def resolve_page_flags(p: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> None:
    """Fill in ``--doc`` and ``--per-seed`` where the page needs them (:func:`add_run_flags`): with
    ``--report-only`` the committed page and its per-seed file, with ``--doc`` alone the page's per-seed file;
    the per-seed file a page is written from is checked as ``--per-seed`` is."""
    if args.report_only and args.doc is None:
        args.doc = default_page(name)
    if args.doc is not None and args.per_seed is None:
        args.per_seed = page_per_seed_file(args.doc)
        if not args.report_only:
            problem = check_per_seed_path(args.per_seed)
            if problem:
                p.error(problem)
    if args.doc is not None and Path(args.doc).suffix.lower() != ".md":
        p.error(f"--doc {args.doc}: a results page is a .md file")


def _distinct(values: Any, kind: type, what: str) -> Optional[str]:
    if not isinstance(values, list) or not values or not all(runs.is_a(v, kind) for v in values):
        return f"{what} must be a non-empty list of {runs.type_name(kind)}"
    if len(set(values)) != len(values):
        return f"{what} must be distinct, got {values}"
    return None


def per_seed_problem(payload: Any, spec: PageSpec) -> Optional[str]:
    """What is wrong with ``payload`` as the per-seed numbers of ``spec``'s page (None when nothing is): the
    experiment's name, a ``python examples/gan/<name>.py`` command, the settings a page reads (distinct seeds and
    K, sizes that are size labels, a positive number of iterations, a plain output folder), one entry per run
    and table cell with its keys and a known status, and every metric of a finished run a finite number."""
    if not isinstance(payload, dict):
        return f"holds a JSON {type(payload).__name__} where an object is expected"
    if payload.get("experiment") != spec.name:
        return f"is the per-seed file of {payload.get('experiment')!r}, not of {spec.name!r}"
    command = payload.get("command")
    try:
        words = shlex.split(command) if report.safe_text(command) else []
    except ValueError:
        words = []
    if words[:2] != ["python", spec.program]:
        return f"'command' must be a one-line 'python {spec.program} ...' without backticks"
    settings = payload.get("settings")
    if not isinstance(settings, dict):
        return "'settings' must be an object"
    for field, kind in (("seeds", int), ("K", int)):
        problem = _distinct(settings.get(field), kind, f"settings.{field}")
        if problem:
            return problem
    if "X" in spec.keys:
        problem = _distinct(settings.get("sizes"), str, "settings.sizes")
        if problem:
            return problem
        try:
            if any(size_label(parse_size(x)) != x for x in settings["sizes"]):
                return f"settings.sizes must be size labels such as '1/4', got {settings['sizes']}"
        except ValueError as error:
            return f"settings.sizes: {error}"
    if not runs.is_a(settings.get("steps"), int) or settings["steps"] < 1:
        return "settings.steps must be a positive integer"
    if not report.safe_text(settings.get("out")):
        return "settings.out must be a one-line folder name"
    for field, kind in (("controls", int), ("alphas", float)):
        if field in settings and settings[field] != []:
            problem = _distinct(settings[field], kind, f"settings.{field}")
            if problem:
                return problem
    rows = [row_of(row) for row in setting_rows(settings)]
    entries = payload.get("runs")
    if not isinstance(entries, list) or not entries:
        return "'runs' must be a non-empty list"
    seen = set()
    for i, entry in enumerate(entries):
        where = f"runs[{i}]"
        if not isinstance(entry, dict):
            return f"{where} must be an object"
        if not report.safe_text(entry.get("run")):
            return f"{where}.run must be a one-line name"
        if entry.get("status") not in RUN_STATUSES:
            return f"{where}.status must be one of {', '.join(RUN_STATUSES)}, got {entry.get('status')!r}"
        if not runs.is_a(entry.get("seed"), int) or entry["seed"] not in settings["seeds"]:
            return f"{where}.seed must be one of settings.seeds {settings['seeds']}, got {entry.get('seed')!r}"
        if not runs.is_a(entry.get("K"), int) or not runs.is_a(entry.get("d_steps", 1), int) \
                or not report.is_finite_number(entry.get("alpha", 0)):
            return f"{where}: K and d_steps must be integers and alpha a finite number"
        if row_of(entry) not in rows:
            return (f"{where} ({row_label(entry)}) is in no row of settings.K {settings['K']}, "
                    f"settings.controls or settings.alphas")
        if "X" in spec.keys and entry.get("X") not in settings["sizes"]:
            return f"{where}.X must be one of settings.sizes {settings['sizes']}, got {entry.get('X')!r}"
        for key, kind in spec.keys.items():
            if not runs.is_a(entry.get(key), kind):
                return f"{where}.{key} must be a {runs.type_name(kind)}"
        if not runs.is_a(entry.get("step", 0), int) or entry.get("step", 0) < 0:
            return f"{where}.step must be a non-negative integer"
        if entry["status"] == "done":
            for metric in spec.metrics:
                if not report.is_finite_number(entry.get(metric)):
                    return f"{where}.{metric} must be a finite number, got {entry.get(metric)!r}"
        cell = (*(entry[k] for k in spec.keys), *row_of(entry), entry["seed"])
        if cell in seen:
            return f"{where} repeats the run of {dict(zip([*spec.keys, 'K', *ROW_FIELDS, 'seed'], cell))}"
        seen.add(cell)
    if spec.check_summary is not None:
        problem = spec.check_summary(payload.get("summary"))
        if problem:
            return f"summary: {problem}"
    return None


def read_per_seed(path: Path, spec: PageSpec) -> Dict[str, Any]:
    """The per-seed numbers in ``path``, read as untrusted input (:func:`report.read_numbers`: at most
    :data:`PER_SEED_MAX_BYTES`, strict JSON) of which :func:`per_seed_problem` finds nothing wrong. Anything else is
    a :class:`PerSeedError`, one line naming the file and the problem."""
    payload: Dict[str, Any] = report.read_numbers(
        path, lambda payload: per_seed_problem(payload, spec),
        "restore the committed file (git) or rerun the experiment with --per-seed", max_bytes=PER_SEED_MAX_BYTES,
        label="per-seed file", error=PerSeedError)
    return payload


def runs_of(payload: Mapping[str, Any], **cell: Any) -> Dict[int, Mapping[str, Any]]:
    """The finished runs of the table cell ``cell`` (e.g. ``X="1/4", K=5``; a control's and an extrapolation's
    cells name their ``d_steps`` or ``alpha``), by seed."""
    return {r["seed"]: r for r in payload["runs"]
            if r["status"] == "done" and all(r.get(k) == v for k, v in cell.items())
            and all(r.get(k) == cell.get(k) for k in ROW_FIELDS)}


def cell_stats(payload: Mapping[str, Any], metric: str, **cell: Any) -> Tuple[float, float]:
    """Mean and standard error over the seeds of ``metric`` in the table cell ``cell`` (:func:`report.mean_and_se`:
    NaN without runs, the standard error NaN for one)."""
    return report.mean_and_se([r[metric] for r in runs_of(payload, **cell).values()])


def seeds_text(seeds: Sequence[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def _regenerate_command(spec: PageSpec, doc: Path, per_seed: Path) -> str:
    words = ["python", spec.program, "--report-only"]
    if Path(doc).resolve() != default_page(spec.name).resolve():
        words += ["--doc", str(doc)]
    if Path(per_seed).resolve() != page_per_seed_file(doc).resolve():
        words += ["--per-seed", str(per_seed)]
    return " ".join(shlex.quote(w) for w in words)


def page_lines(spec: PageSpec, payload: Mapping[str, Any], doc: Path, per_seed: Path) -> List[str]:
    """The page: the title, the opening (the kept verdict and the main figure), the kept ``about`` block (what is
    measured, how to run it), the command that made the numbers (the per-seed file's, without ``--resume``, which
    does not change them), the kept ``run`` block (when and where), the tables of ``spec.body``, the command that
    remakes the page, and the kept notes."""
    doc = Path(doc)
    words = shlex.split(payload["command"])
    made_by = report.command_line(words[1], words[2:], drop=("--resume", "--report-only"))
    figures = [(doc.with_suffix("") / file, alt) for file, alt in spec.figures]
    settings = payload["settings"]
    verdict = (f"\n**Verdict: not written yet.** {len(settings['seeds'])} seeds, {settings['steps']:,} iterations "
               f"per run; state what the table below shows and against which control.\n")
    seeds = len(settings["seeds"])
    link = report.link_from(doc, per_seed)
    return [
        f"# {spec.title}{spec.subtitle(settings) if spec.subtitle is not None else ''}", "",
        *report.opening(doc, figures[0] if figures else None, verdict),
        report.notes_block(doc, f"\n{spec.about}\n", "about"), "",
        "## Our numbers", "",
        *report.made_by(made_by), "",
        report.notes_block(doc, "\n", "run"), "",
        f"Mean ± standard error over the {seeds} seed{'s' if seeds != 1 else ''} (one seed: its value alone). "
        f"Every run's final numbers are in [{link}]({link}), and `{settings['out']}/results.json` holds every run "
        f"in full.", "",
        *spec.body(payload, doc),
        *report.made_by(_regenerate_command(spec, doc, per_seed),
                        "This page is remade from those numbers, training nothing and keeping its hand-written "
                        "text, by:"), "",
        report.notes_block(doc, "\n"), "",
    ]


def write_page(spec: PageSpec, doc: Path, per_seed: Path) -> None:
    """Write ``spec``'s page ``doc`` from the per-seed file ``per_seed`` (:func:`read_per_seed`: a damaged file is
    refused before anything is written)."""
    payload = read_per_seed(per_seed, spec)
    report.write_page(Path(doc), page_lines(spec, payload, Path(doc), Path(per_seed)))


def publish(spec: PageSpec, args: argparse.Namespace, out: Path, log: Callable[[str], None] = print) -> None:
    """After training with ``--doc``: copy the page's figures from the run folder ``out`` beside the page, then
    write the page from the per-seed file just written."""
    if args.doc is None:
        return
    for file, _ in spec.figures:
        report.copy_beside_page(Path(out) / file, Path(args.doc).with_suffix("") / file)
    write_page(spec, args.doc, args.per_seed)
    log(f"results page: {args.doc}")


def report_only(spec: PageSpec, args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``--report-only``: remake the page from its per-seed file, training nothing."""
    write_page(spec, args.doc, args.per_seed)
    log(f"results page: {args.doc} (from {args.per_seed})")
    return 0


def check_diversity_summary(summary: Any) -> Optional[str]:
    """What is wrong with the ``summary`` of ``mnist_rnn.py`` and ``cifar10.py`` (None when nothing is): Table 3's
    ``percent_best`` per K (0 to 100) and the data's ``data_mean_distance``; a file without a summary is read,
    its page shows neither."""
    if summary is None:
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("percent_best"), dict):
        return "must be an object with 'percent_best' and 'data_mean_distance'"
    for K, value in summary["percent_best"].items():
        if not K.isdigit() or not report.is_finite_number(value) or not 0 <= value <= 100:
            return f"percent_best[{K!r}] must be a percentage of a K, got {value!r}"
    if not report.is_finite_number(summary.get("data_mean_distance")) or summary["data_mean_distance"] < 0:
        return f"data_mean_distance must be a non-negative number, got {summary.get('data_mean_distance')!r}"
    return None


def diversity_summary(diversity: Mapping[str, Mapping[str, float]], data_profile: Mapping[str, Any]
                      ) -> Dict[str, Any]:
    """The per-seed file's ``summary`` of the diversity scripts: Table 3's percent best rank per K and the mean
    pair distance of the data."""
    return {"percent_best": {K: row["percent_best"] for K, row in diversity.items()},
            "data_mean_distance": data_profile["mean_distance"]}


def diversity_body(payload: Mapping[str, Any], doc: Path, mse_spec: str = ".3f", distance_spec: str = ".2f",
                   paper: Optional[Mapping[str, str]] = None) -> List[str]:
    """The tables of a diversity script's page (Sec. 3.4): per K the reconstruction MSE and the mean pair
    distance (mean ± s.e.), the percent best rank and the data's mean distance from the file's ``summary`` ("—"
    without one), ``paper``'s Table 3 entry per K when given; then every seed's numbers and the distance
    histograms (``pairwise_distances.png`` beside the page, when there)."""
    settings, summary = payload["settings"], payload.get("summary") or {}
    best = summary.get("percent_best", {})
    data = summary.get("data_mean_distance")
    rows = []
    for K in settings["K"]:
        mse, distance = cell_stats(payload, "recon_mse", K=K), cell_stats(payload, "mean_distance", K=K)
        rows.append([str(K), _formatted(mse, mse_spec), f"{best[str(K)]:.2f}%" if str(K) in best else "—",
                     _formatted(distance, distance_spec)] + ([paper.get(str(K), "—")] if paper is not None else []))
    header = ["K", "reconstruction MSE (ours)", "percent best rank (ours)",
              "mean pair distance (ours" + (f"; data: {data:.2f})" if data is not None else ")")]
    header += ["paper (MSE, percent best rank)"] if paper is not None else []

    def per_seed(metric: str, spec: str) -> List[str]:
        return [", ".join(format(c[s][metric], spec) if s in c else "—" for s in settings["seeds"])
                for c in (runs_of(payload, K=K) for K in settings["K"])]

    mse_seeds, distance_seeds = per_seed("recon_mse", mse_spec), per_seed("mean_distance", distance_spec)
    lines = [report.table(rows, header), "",
             f"Per seed ({seeds_text(settings['seeds'])}): reconstruction MSE "
             + " against ".join(f"{text} (K = {K})" for text, K in zip(mse_seeds, settings["K"]))
             + "; mean pair distance " + " against ".join(distance_seeds) + ".", ""]
    histograms = Path(doc).with_suffix("") / "pairwise_distances.png"
    if histograms.is_file():
        lines += ["The pairwise-distance histograms (Fig. 6's layout; the first seed of each K):", "",
                  report.figure(doc, histograms, "pairwise distances"), ""]
    return lines


def _formatted(stats: Tuple[float, float], spec: str) -> str:
    return "—" if math.isnan(stats[0]) else report.plus_minus(*stats, spec)
