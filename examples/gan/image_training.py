"""One training loop for the image GANs of Metz et al. (2017), Sec. 3.2-3.4, and what their scripts share.

An *iteration* is one discriminator update then one generator update (the paper counts each network update as
a step, so App. C's 150k steps are 75k iterations here). Per iteration:

1. ``fake = G(z)`` once, for both players;
2. D takes a ``torch.optim.Adam`` step on ``L_D = -log D(x) - log(1 - D(fake))``;
3. G takes an Adam step on ``unroll.surrogate_loss``: K Adam steps of D unrolled from D's *current* Adam state
   (``unroll.from_torch``), on the same minibatch, BatchNorm buffers passed with ``buffers=``; the generator's
   loss is evaluated at the unrolled discriminator and differentiated through the K steps (Eq. 12).

Only names in ``unroll.__all__`` are used. Seeds are paired across K: the initial weights and the data and
latent streams of seed ``s`` do not depend on K. :class:`GANTrainer` checkpoints atomically, resumes to exactly
the numbers of an uninterrupted run, and stops with :class:`ImageTrainingDiverged` (naming the iteration and
the last good checkpoint, which it keeps) when a loss becomes NaN or infinite. :func:`run_experiment` trains
a list of runs, one after another or in forked worker processes, and collects their evaluations; the rest are
the scripts' shared flags, tables and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll
from image_models import LATENT_DIM, parse_size, size_label
from models import d_loss_from_logits, nonsaturating_g_loss
from training import TrainingDiverged, atomic_torch_save, atomic_write_bytes

G_LOSSES = ("nonsaturating", "minimax")
CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
# The reduced defaults of the conv experiments (Stacked MNIST, colored MNIST, CIFAR-10) train D and G at this rate:
# at App. D's 2e-4 / 1e-4 their generators still output noise at the end of a CPU-sized budget (1,200-1,500
# iterations), while at 1e-3 they draw digits within it (docs/results/stacked_mnist.md, colored_mnist.md).
REDUCED_LR = 1e-3
LR_NOTE = ("learning rates: D {d_lr}, G {g_lr}; App. D's are 2e-4 and 1e-4, and the reduced default uses 1e-3 "
           "for both because at App. D's rates these generators still output noise after 1,200-1,500 iterations")
# Per-seed random streams: stream j of seed s is seeded with s * _STREAMS + j.
_STREAMS = 16
_INIT, _DATA, _LATENT, _FIXED, _EVAL = 0, 1, 2, 3, 4


# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class GANConfig:
    """One training run. Defaults: App. D (G lr 1e-4, D lr 2e-4) with Adam beta1 = 0.5 (App. A/C)."""

    K: int = 0
    steps: int = 1000
    batch: int = 64
    d_lr: float = 2e-4
    g_lr: float = 1e-4
    unroll_lr: Optional[float] = None  # None: the discriminator's own learning rate, as in the paper
    beta1: float = 0.5
    beta2: float = 0.999
    g_loss: str = "nonsaturating"
    seed: int = 0
    snapshot_every: int = 100  # sample grids over training (Fig. 3)
    snapshot_samples: int = 36
    checkpoint_every: int = 100

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        checks = [
            (self.K >= 0, f"K must be >= 0, got {self.K}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch >= 2, f"batch must be >= 2 (batch normalization needs 2 samples), got {self.batch}"),
            (all(lr > 0 for lr in (self.d_lr, self.g_lr, self.unroll_lr or 1.0)), "learning rates must be > 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got {self.beta1}, "
                                                          f"{self.beta2}"),
            (self.g_loss in G_LOSSES, f"g_loss must be one of {G_LOSSES}, got {self.g_loss!r}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.snapshot_every >= 1, f"snapshot_every must be >= 1, got {self.snapshot_every}"),
            (self.snapshot_samples >= 1, f"snapshot_samples must be >= 1, got {self.snapshot_samples}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class ImageGAN:
    """What the loop needs from an experiment: fresh models and a sampler of real images in [-1, 1]."""

    name: str
    make_generator: Callable[[], nn.Module]
    make_discriminator: Callable[[], nn.Module]
    sample_data: Callable[[int, torch.Generator], Tensor]
    latent_dim: int = LATENT_DIM


class ImageTrainingDiverged(TrainingDiverged):
    """A loss became NaN or infinite at iteration ``step``; the checkpoint of iteration ``checkpoint_step`` (the
    last good one, or none) is kept untouched."""

    def __init__(self, step: int, seed: int, which: str, value: float, checkpoint: Optional[Path],
                 checkpoint_step: Optional[int]) -> None:
        super().__init__(step, seed, which, value)
        kept = ("no checkpoint was written" if checkpoint is None or checkpoint_step is None
                else f"last good checkpoint: {checkpoint} at iteration {checkpoint_step}")
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        self.args = (f"training diverged: non-finite {which} ({value}) at iteration {step} for seed {seed}; "
                     f"{kept}",)


# ----------------------------------------------------------------------------------------------- trainer


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 (compact snapshots)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def from_uint8(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1


class GANTrainer:
    """Trains one :class:`ImageGAN` with :class:`GANConfig`; ``out_dir=None`` keeps everything in memory."""

    def __init__(self, gan: ImageGAN, cfg: GANConfig, out_dir: Optional[Path] = None, resume: bool = False,
                 device: str = "cpu", progress: bool = False, desc: str = "") -> None:
        cfg.validate()
        self.gan, self.cfg, self.device = gan, cfg, torch.device(device)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress, self.desc = progress, desc or f"{gan.name} K={cfg.K} seed={cfg.seed}"
        stream = lambda j: torch.Generator().manual_seed(cfg.seed * _STREAMS + j)  # noqa: E731
        with torch.random.fork_rng(devices=[]):
            # Module initialisers draw from the global generator; fork it so the caller's stream is untouched.
            torch.manual_seed(cfg.seed * _STREAMS + _INIT)
            self.G = gan.make_generator().to(self.device)
            self.D = gan.make_discriminator().to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=cfg.g_lr, betas=betas)
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=cfg.d_lr, betas=betas)
        # With a separate unroll learning rate the look-ahead optimizer differs; the state still comes from D's.
        self.unroll_opt = None if cfg.unroll_lr is None else unroll.adam(cfg.unroll_lr, betas=betas)
        self.data_gen, self.latent_gen = stream(_DATA), stream(_LATENT)
        self.fixed_z = torch.randn(cfg.snapshot_samples, gan.latent_dim, generator=stream(_FIXED))
        self.step = 0
        self.losses: List[Tuple[float, float]] = []  # (d_loss, g_loss) of every iteration
        self.snapshots: List[Tuple[int, Tensor]] = []  # (iteration, uint8 samples of fixed_z)
        self.train_seconds = 0.0
        self.checkpoint_step: Optional[int] = None
        if resume:
            self.load_checkpoint()

    # ----- the losses -----
    def _logits(self, params: Mapping[str, Tensor], images: Tensor) -> Tensor:
        return functional_call(self.D, dict(params), (images,))

    def d_loss(self, params: Mapping[str, Tensor], x: Tensor, fake: Tensor) -> Tensor:
        """L_D with real and generated images in separate batches (separate batch-norm statistics, as DCGAN)."""
        return d_loss_from_logits(self._logits(params, x), self._logits(params, fake))

    def g_loss_at(self, params: Mapping[str, Tensor], x: Tensor, fake: Tensor) -> Tensor:
        """-log D(G(z)) at the (unrolled) discriminator ``params`` (App. C/D's L_G, read as non-saturating)."""
        return nonsaturating_g_loss(self._logits(params, fake))

    def unrolled_g_loss(self, x: Tensor, fake: Tensor) -> Tensor:
        """The generator's loss f_K (Eq. 9): K Adam steps of D from its current parameters and Adam state
        (``unroll.from_torch``), then G's loss at the unrolled D; differentiable in ``fake`` through all K steps."""
        inner_opt, d_state = unroll.from_torch(self.d_opt, self.D)
        surrogate = unroll.surrogate_loss(self.d_loss, self.cfg.K, optimizer=self.unroll_opt or inner_opt,
                                          outer_fn=self.g_loss_at if self.cfg.g_loss == "nonsaturating" else None)
        d_params = {name: p.detach() for name, p in self.D.named_parameters()}
        try:
            return surrogate(d_params, d_state, x, fake, buffers=dict(self.D.named_buffers()))
        except unroll.NonFiniteLossError as error:
            raise self._diverged(f"unrolled discriminator loss (unrolled step {error.step})", error.value) from error

    # ----- one iteration -----
    def draw(self) -> Tuple[Tensor, Tensor]:
        """This iteration's real images and latents (CPU streams: the same numbers on every device)."""
        x = self.gan.sample_data(self.cfg.batch, self.data_gen)
        z = torch.randn(self.cfg.batch, self.gan.latent_dim, generator=self.latent_gen)
        return x.to(self.device), z.to(self.device)

    def train_step(self) -> Tuple[float, float]:
        """One D update then one G update; raises :class:`ImageTrainingDiverged` before stepping on a NaN/inf."""
        x, z = self.draw()
        fake = self.G(z)  # one forward pass serves both players
        d_loss = self.d_loss(dict(self.D.named_parameters()), x, fake.detach())
        self._check("discriminator loss", d_loss)
        self.d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_opt.step()

        g_loss = self.unrolled_g_loss(x, fake)
        self._check("generator loss", g_loss)
        self.g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_opt.step()
        return float(d_loss.detach()), float(g_loss.detach())

    def _check(self, which: str, value: Tensor) -> None:
        if not bool(torch.isfinite(value)):
            raise self._diverged(which, float(value.detach()))

    def _diverged(self, which: str, value: float) -> ImageTrainingDiverged:
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT
        return ImageTrainingDiverged(self.step + 1, self.cfg.seed, which, value, path, self.checkpoint_step)

    # ----- sampling -----
    def forward_eval(self, z: Tensor) -> Tensor:
        """G(z) in evaluation mode (batch norm from running statistics: each sample depends on its z alone),
        differentiable in ``z`` (inference via optimisation)."""
        was_training = self.G.training
        self.G.eval()
        try:
            return self.G(z.to(self.device))
        finally:
            self.G.train(was_training)

    @torch.no_grad()
    def generate(self, z: Tensor, chunk: int = 500) -> Tensor:
        """:meth:`forward_eval` on the CPU-side latents ``z``, ``chunk`` at a time; returns CPU images."""
        return torch.cat([self.forward_eval(z[i:i + chunk]).cpu() for i in range(0, z.shape[0], chunk)])

    def eval_latents(self, n: int) -> Tensor:
        """``n`` latents from the seed's evaluation stream (fixed per seed, independent of K)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * _STREAMS + _EVAL)
        return torch.randn(n, self.gan.latent_dim, generator=gen)

    def samples(self, n: int) -> Tensor:
        return self.generate(self.eval_latents(n))

    def snapshot(self) -> None:
        if not self.snapshots or self.snapshots[-1][0] != self.step:
            self.snapshots.append((self.step, to_uint8(self.generate(self.fixed_z))))

    # ----- checkpoints -----
    def state_dict(self) -> Dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg), "gan": self.gan.name, "step": self.step,
            "G": self.G.state_dict(), "D": self.D.state_dict(),
            "g_opt": self.g_opt.state_dict(), "d_opt": self.d_opt.state_dict(),
            "rng": {"data": self.data_gen.get_state(), "latent": self.latent_gen.get_state()},
            "losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2),
            "snapshots": self.snapshots, "train_seconds": self.train_seconds,
        }

    def save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        atomic_torch_save(self.state_dict(), self.out_dir / CHECKPOINT)
        self.checkpoint_step = self.step

    def load_checkpoint(self) -> None:
        path = None if self.out_dir is None else self.out_dir / CHECKPOINT
        if path is None or not path.is_file():
            raise FileNotFoundError(f"resume: there is no {path}")
        # CPU first: the RNG states must stay CPU tensors; load_state_dict copies the rest onto the device.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved, now = dict(ckpt["config"]), dataclasses.asdict(self.cfg)
        # Only the length of training and the checkpoint interval may change: anything else would mix two runs.
        different = sorted(k for k in now if k not in ("steps", "checkpoint_every") and saved.get(k) != now[k])
        if different or ckpt["gan"] != self.gan.name:
            raise ValueError(f"resume: {path} was made with other settings ({', '.join(different) or 'model'}); "
                             f"use the same flags or another output folder")
        self.G.load_state_dict(ckpt["G"])
        self.D.load_state_dict(ckpt["D"])
        self.g_opt.load_state_dict(ckpt["g_opt"])
        self.d_opt.load_state_dict(ckpt["d_opt"])
        self.data_gen.set_state(ckpt["rng"]["data"])
        self.latent_gen.set_state(ckpt["rng"]["latent"])
        self.step = self.checkpoint_step = int(ckpt["step"])
        self.losses = [tuple(row) for row in ckpt["losses"].tolist()]
        self.snapshots = list(ckpt["snapshots"])
        self.train_seconds = float(ckpt["train_seconds"])

    # ----- the loop -----
    def run(self) -> None:
        """Train to ``cfg.steps`` iterations (from where a resumed run stands)."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.step == 0:
            self.snapshot()
        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), disable=not self.progress,
                   dynamic_ncols=True, desc=self.desc, mininterval=1.0)
        try:
            while self.step < cfg.steps:
                start = time.perf_counter()
                losses = self.train_step()
                self.train_seconds += time.perf_counter() - start
                self.losses.append(losses)
                self.step += 1
                bar.update(1)
                if self.step % 10 == 0:
                    bar.set_postfix(d_loss=f"{losses[0]:.3f}", g_loss=f"{losses[1]:.3f}")
                if self.step % cfg.snapshot_every == 0 or self.step == cfg.steps:
                    self.snapshot()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()

    def summary(self, max_points: int = 200) -> Dict[str, Any]:
        """Configuration, progress and the loss curves (averaged into at most ``max_points`` windows)."""
        losses = np.asarray(self.losses, dtype=np.float64).reshape(-1, 2)
        window = max(1, math.ceil(len(losses) / max_points))
        curve = [{"step": int(min(i + window, len(losses))), "d_loss": float(chunk[:, 0].mean()),
                  "g_loss": float(chunk[:, 1].mean())}
                 for i in range(0, len(losses), window) for chunk in [losses[i:i + window]]]
        return {"config": dataclasses.asdict(self.cfg), "step": self.step, "losses": curve,
                "train_seconds": round(self.train_seconds, 2),
                "seconds_per_iteration": round(self.train_seconds / max(self.step, 1), 4)}


# ------------------------------------------------------------------------------------ several runs


@dataclass(frozen=True)
class RunSpec:
    """One run of an experiment: ``key`` names its table cell (e.g. ``{"X": "1/4", "K": 5}``)."""

    gan: ImageGAN
    cfg: GANConfig
    key: Mapping[str, Any]

    @property
    def folder(self) -> str:
        parts = [f"{k}{str(v).replace('/', '_')}" for k, v in self.key.items()]
        return "-".join(parts + [f"seed{self.cfg.seed}"])

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.key.items())


Evaluate = Callable[[GANTrainer, RunSpec, Path], Dict[str, Any]]
"""``evaluate(trainer, spec, run_dir) -> metrics`` (JSON-serialisable), called once a run has finished."""


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1) + "\n").encode())


def can_fork() -> bool:
    """Whether ``workers > 1`` is available: the runs are handed to forked processes (Linux), because the specs
    hold closures (models, data samplers, evaluators) that cannot be pickled for a spawned one."""
    return "fork" in multiprocessing.get_all_start_methods()


# What the forked workers of run_experiment read: set just before the fork, inherited by the children.
_WORK: Dict[str, Any] = {}


def _train_one(index: int) -> List[str]:
    """Worker: train and evaluate run ``index`` of the job in ``_WORK``; returns its log lines."""
    job = _WORK
    torch.set_num_threads(job["threads"])
    lines: List[str] = []
    run_experiment([job["specs"][index]], job["out_dir"], job["evaluate"], job["resume"], job["device"],
                   progress=False, log=lines.append)
    return lines


def _train_in_workers(specs: Sequence[RunSpec], out_dir: Path, evaluate: Evaluate, resume: bool, device: str,
                      workers: int, progress: bool, log: Callable[[str], None]) -> None:
    """Train and evaluate every run in ``workers`` forked processes (each with the caller's torch thread count),
    costliest (largest K) first; each run writes its checkpoint and ``result.json`` as in the sequential loop.
    The first error (or Ctrl-C) stops the other workers at once; their checkpoints are written atomically, so
    ``--resume`` goes on."""
    from tqdm import tqdm

    if not can_fork():
        raise RuntimeError("workers > 1 needs the 'fork' start method, which this platform does not have")
    order = sorted(range(len(specs)), key=lambda i: -specs[i].cfg.K)
    workers = min(workers, len(specs))
    context = multiprocessing.get_context("fork")
    before = set(context.active_children())
    _WORK.update(specs=list(specs), out_dir=Path(out_dir), evaluate=evaluate, resume=resume, device=device,
                 threads=torch.get_num_threads())
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_train_one, i) for i in order]
            try:
                with tqdm(total=len(specs), disable=not progress, desc=f"runs ({workers} workers)") as bar:
                    for future in as_completed(futures):
                        bar.update(1)
                        for line in future.result():
                            bar.write(line) if progress else log(line)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                for child in set(context.active_children()) - before:
                    child.terminate()
                raise
    finally:
        _WORK.clear()


def run_experiment(specs: Sequence[RunSpec], out_dir: Path, evaluate: Evaluate, resume: bool = False,
                   device: str = "cpu", progress: bool = False, log: Callable[[str], None] = print,
                   workers: int = 1) -> Tuple[List[Dict[str, Any]], Dict[str, GANTrainer]]:
    """Train and evaluate every run; returns ``(records, trainers)``, the trainers of the first finished run of
    every table cell (by folder; the others are dropped to bound memory).

    Each run lives in ``out_dir/<spec.folder>/`` (``checkpoint.pt``, ``result.json``). With ``resume``, finished
    runs are reloaded (their evaluation reused when ``result.json`` matches) and an interrupted one continues
    from its checkpoint. A run that diverges is recorded with ``status: "diverged"`` (its last good checkpoint
    kept) and the others go on. ``workers > 1`` trains the runs in that many forked CPU processes (with this
    process's thread count) and then reloads them here; every run's numbers are the same as with one worker.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and len(specs) > 1:
        _train_in_workers(specs, out_dir, evaluate, resume, device, workers, progress, log)
        resume, progress, log = True, False, lambda line: None  # the runs are done: reload them quietly
    records: List[Dict[str, Any]] = []
    trainers: Dict[str, GANTrainer] = {}
    for i, spec in enumerate(specs):
        run_dir = Path(out_dir) / spec.folder
        cached = _read_json(run_dir / RESULT) if resume else None
        if cached is not None and cached.get("status") == "diverged" \
                and cached.get("config") == dataclasses.asdict(spec.cfg):
            records.append(cached)  # training is deterministic: it would diverge at the same iteration again
            continue
        trainer = GANTrainer(spec.gan, spec.cfg, run_dir, resume=resume and (run_dir / CHECKPOINT).is_file(),
                             device=device, progress=progress, desc=f"[{i + 1}/{len(specs)}] {spec.label} "
                                                                    f"seed={spec.cfg.seed}")
        base = {"run": spec.folder, **dict(spec.key), "seed": spec.cfg.seed}
        try:
            trainer.run()
        except ImageTrainingDiverged as error:
            log(f"{spec.folder}: {error}")
            record = {**base, "status": "diverged", "diverged_at": error.step, "error": str(error),
                      **trainer.summary()}
            write_json(run_dir / RESULT, record)
            records.append(record)
            continue
        if not any(other.label == spec.label for other in specs if other.folder in trainers):
            trainers[spec.folder] = trainer  # only the first finished run of each cell, for the figures
        summary = trainer.summary()
        if cached is not None and cached.get("status") == "done" and cached.get("config") == summary["config"] \
                and cached.get("step") == trainer.step:
            records.append(cached)
            continue
        start = time.perf_counter()
        metrics = evaluate(trainer, spec, run_dir)
        record = {**base, "status": "done", **metrics, **summary,
                  "eval_seconds": round(time.perf_counter() - start, 2)}
        write_json(run_dir / RESULT, record)
        records.append(record)
        log(f"{spec.folder}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in metrics.items() if isinstance(v, (int, float))))
    return records, trainers


# ------------------------------------------------------------------------------------ tables


def mean_and_se(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value; NaN for none)."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def aggregate(records: Sequence[Mapping[str, Any]], key_names: Sequence[str], metrics: Sequence[str]
              ) -> List[Dict[str, Any]]:
    """One row per table cell (the values of ``key_names``, in first-seen order): mean and s.e. over seeds of
    each metric of the finished runs, and how many runs finished or diverged."""
    cells: Dict[Tuple, List[Mapping[str, Any]]] = {}
    for record in records:
        cells.setdefault(tuple(record[k] for k in key_names), []).append(record)
    rows = []
    for key, group in cells.items():
        done = [r for r in group if r.get("status") == "done"]
        row: Dict[str, Any] = {**dict(zip(key_names, key)), "runs": len(done),
                               "diverged": len(group) - len(done)}
        for metric in metrics:
            row[metric], row[f"{metric}_se"] = mean_and_se([r[metric] for r in done if metric in r])
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str]],
                   paper: Optional[Mapping[Tuple, str]] = None, key_names: Sequence[str] = ()) -> str:
    """``columns`` are ``(metric, header)``; cells show ``mean ± s.e.``. ``paper`` maps a row's key tuple to the
    published entry, shown in a last column."""
    headers = list(key_names) + [h for _, h in columns] + ["runs"] + (["paper"] if paper is not None else [])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(row[k]) for k in key_names]
        for metric, _ in columns:
            mean, se = row[metric], row[f"{metric}_se"]
            cells.append("—" if math.isnan(mean) else f"{mean:.4g} ± {se:.2g}")
        cells.append(f"{row['runs']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else ""))
        if paper is not None:
            cells.append(paper.get(tuple(row[k] for k in key_names), "—"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ shared flags and config


def add_common_flags(parser: argparse.ArgumentParser, reduced: Mapping[str, Any]) -> None:
    """Flags every image script has. Settings that ``--paper`` switches default to ``None`` here and are
    resolved by :func:`resolve`."""
    p = parser
    p.add_argument("--paper", action="store_true",
                   help="the paper's full configuration (explicit flags still override it)")
    p.add_argument("--K", type=int, nargs="+", default=None, metavar="K",
                   help=f"unrolled discriminator steps (default {' '.join(map(str, reduced['K']))})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help=f"seeds (default {' '.join(map(str, reduced['seeds']))})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training iterations, one D and one G update each (default {reduced['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"minibatch size (default {reduced['batch']})")
    p.add_argument("--d-lr", type=float, default=None)
    p.add_argument("--g-lr", type=float, default=None)
    p.add_argument("--unroll-lr", type=float, default=None,
                   help="learning rate of the K look-ahead Adam steps (default: the discriminator's, as the paper)")
    p.add_argument("--beta1", type=float, default=None)
    p.add_argument("--g-loss", choices=G_LOSSES, default=None,
                   help="nonsaturating: -log D(G(z)) (default); minimax: G maximises L_D")
    p.add_argument("--snapshot-every", type=int, default=None, help="iterations between sample-grid snapshots")
    p.add_argument("--checkpoint-every", type=int, default=None, help="iterations between checkpoints")
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: these small models gain little from more threads, and the "
                        "timings in the docs are for 1)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs trained at once, each in its own process with --threads threads (default: one per CPU "
                        "core for --device cpu where processes can fork, else 1); the numbers do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def size_arg(text: str) -> str:
    """argparse type for a size multiplier: ``"0.25"`` or ``"1/4"`` -> ``"1/4"``."""
    try:
        return size_label(parse_size(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def resolve(args: argparse.Namespace, reduced: Mapping[str, Any], paper: Mapping[str, Any]) -> Dict[str, Any]:
    """Every setting: the flag if given, else the paper's value with ``--paper``, else the reduced default."""
    base = {**reduced, **paper} if args.paper else dict(reduced)
    out = {}
    for name, default in base.items():
        value = getattr(args, name, None)
        out[name] = default if value is None else value
    return out


def make_config(settings: Mapping[str, Any], K: int, seed: int) -> GANConfig:
    """The :class:`GANConfig` of one run from a script's resolved settings."""
    return GANConfig(K=K, steps=settings["steps"], batch=settings["batch"], d_lr=settings["d_lr"],
                     g_lr=settings["g_lr"], unroll_lr=settings["unroll_lr"], beta1=settings["beta1"],
                     g_loss=settings["g_loss"], seed=seed, snapshot_every=settings["snapshot_every"],
                     checkpoint_every=settings["checkpoint_every"])


def check_common(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Mapping[str, Any]) -> Path:
    """Turn invalid settings into argparse errors before any work; returns the output folder."""
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("K", "seeds"):
        values = list(settings[name])
        if len(set(values)) != len(values):
            parser.error(f"--{name} values must be distinct, got {values}")
    try:
        for K in settings["K"]:
            for seed in settings["seeds"]:
                make_config(settings, K, seed).validate()
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.workers is None:
        args.workers = default_workers(device)
    elif args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    elif args.workers > 1 and not can_run_in_workers(device):
        parser.error(f"--workers {args.workers}: parallel runs need --device cpu and a platform that can fork "
                     f"processes (Linux); use --workers 1")
    out = Path(args.out or settings["out"])
    has_runs = any(out.glob(f"*/{CHECKPOINT}"))
    if not args.resume and has_runs:
        parser.error(f"{out} already holds runs; pass --resume to continue them or choose another --out")
    if args.resume and not has_runs:
        parser.error(f"--resume: {out} holds no checkpoints to continue")
    return out


def can_run_in_workers(device: torch.device) -> bool:
    """Whether runs on ``device`` can be trained in forked worker processes: CPU runs where processes can fork."""
    return device.type == "cpu" and can_fork()


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


# -------------------------------------------------------------------------------------------- figures


def image_grid(images: Tensor, ncol: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] (or uint8) -> one [rows*(H+pad), ncol*(W+pad), 3] float array in [0, 1]."""
    if images.dtype == torch.uint8:
        images = from_uint8(images)
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.ones(3, nrow * (h + pad) - pad, ncol * (w + pad) - pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = images[i]
    return grid.permute(1, 2, 0).numpy()


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_samples_over_training(rows: Sequence[Tuple[str, Sequence[Tuple[int, Tensor]]]], path: Path,
                               max_cols: int = 8, per_cell: int = 16, title: str = "") -> None:
    """Fig. 3: one row per run (label, [(iteration, samples), ...]), evenly spaced snapshots as columns."""
    plt = pyplot()
    n_cols = max(1, min(max_cols, max(len(snaps) for _, snaps in rows)))
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.7 * n_cols, 1.8 * len(rows) + 0.4), squeeze=False)
    for r, (label, snaps) in enumerate(rows):
        picks = sorted({round(i * (len(snaps) - 1) / max(n_cols - 1, 1)) for i in range(n_cols)})
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picks):
                ax.axis("off")
                continue
            step, images = snaps[picks[c]]
            ax.imshow(image_grid(images[:per_cell]), interpolation="nearest")
            ax.set_title(f"{step}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sample_panels(panels: Sequence[Tuple[str, Tensor]], path: Path, ncol: int = 4, title: str = "") -> None:
    """One panel of samples per model (Fig. 4, App. F.5), ``ncol`` panels a row."""
    plt = pyplot()
    nrow = math.ceil(len(panels) / ncol)
    ncol = min(ncol, len(panels))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.8 * nrow + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(panels):
            ax.axis("off")
            continue
        label, images = panels[i]
        ax.imshow(image_grid(images), interpolation="nearest")
        ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_loss_curves(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """D and G losses over training, one line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for record in records:
        curve = record.get("losses") or []
        steps = [p["step"] for p in curve]
        for ax, which in zip(axes, ("d_loss", "g_loss")):
            ax.plot(steps, [p[which] for p in curve], lw=0.8, label=record["run"])
    for ax, which in zip(axes, ("discriminator loss L_D", "generator loss (at the unrolled D)")):
        ax.set_title(which, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
    axes[1].legend(fontsize=5, ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------- outputs


def first_finished(specs: Sequence[RunSpec], trainers: Mapping[str, GANTrainer]
                   ) -> Dict[str, Tuple[RunSpec, GANTrainer]]:
    """The first finished run (lowest listed seed) of every table cell, keyed by its label; for figures."""
    first: Dict[str, Tuple[RunSpec, GANTrainer]] = {}
    for spec in specs:
        if spec.folder in trainers and spec.label not in first:
            first[spec.label] = (spec, trainers[spec.folder])
    return first


def finish(out: Path, name: str, argv: Optional[Sequence[str]], settings: Mapping[str, Any], notes: Sequence[str],
           records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], table: str,
           trainers: Mapping[str, GANTrainer], specs: Sequence[RunSpec], start: float,
           extra: Optional[Mapping[str, Any]] = None, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write ``results.json`` and the figures every script has, and print the table and the deviations.

    Figures: ``samples.png`` (final samples of each table cell's first finished seed), ``samples_over_training.png``
    (Fig. 3-style rows per cell) and ``losses.png``.
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
        "status": "done" if all(r["status"] == "done" for r in records) else "some runs diverged",
        "settings": dict(settings), "deviations": list(notes), **(extra or {}), "table": list(rows),
        "table_markdown": table, "runs": list(records), "environment": environment(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "results.json", payload)
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
    log(f"wall time {payload['wall_seconds']:.0f} s")
    return payload
