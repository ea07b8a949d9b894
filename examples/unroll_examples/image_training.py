"""One training loop for the image GANs of Metz et al. (2017), Sec. 3.2-3.4, and what their scripts share.

An *iteration* is one discriminator update then one generator update (the paper counts each network update as
a step, so App. C's 150k steps are 75k iterations here). Per iteration:

1. ``fake = G(z)`` once, for both players;
2. D takes a ``torch.optim.Adam`` step on ``L_D = -log D(x) - log(1 - D(fake))`` (``d_steps`` of them on the
   same minibatch for the controls that commit the look-ahead's compute instead of unrolling it);
3. G takes an Adam step on ``unroll.surrogate_loss``: K Adam steps of D unrolled from D's *current* Adam state
   (``unroll.from_torch``), on the same minibatch, BatchNorm buffers passed with ``buffers=``; the generator's
   loss is evaluated at the unrolled discriminator and differentiated through the K steps (Eq. 12). With
   ``alpha``, ``unroll.extrapolated_surrogate_loss`` instead: one unrolled step, extrapolated (Sec. 4).

Only names in ``unroll.__all__`` are used. Seeds are paired across K: the initial weights and the data and
latent streams of seed ``s`` do not depend on K. :class:`GANTrainer` checkpoints through :mod:`runs` (atomic,
read back with ``weights_only=True``, other settings refused), resumes to exactly the numbers of an uninterrupted
run, and stops with :class:`runs.Diverged` (naming the iteration, the seed and the last good checkpoint,
which it keeps) when a loss, a parameter, a buffer or an Adam state becomes NaN or infinite. :func:`run_experiment`
trains a list of runs, one after another or in forked worker processes, and collects their evaluations.

Data-parallel (``torchrun``, :mod:`parallel`): every rank draws the same global minibatch and keeps its slice;
D's committed gradient, its K unrolled gradients (``transform_grads``) and G's gradient are averaged over ranks,
and so are the logged losses and, after every iteration, the BatchNorm running statistics, so every rank holds
the same parameters, buffers and Adam states; rank 0 alone writes. Without BatchNorm this is the one-process
algorithm on the global batch; with it, each rank normalises by its shard's batch statistics, not the global
batch's (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll

from . import loop, runs
from .image_models import LATENT_DIM
from .models import d_loss_from_logits, nonsaturating_g_loss
from .parallel import DataParallel
from .plotting import FigureBudget, plot_samples_over_training, to_uint8
from .runs import CHECKPOINT

G_LOSSES = ("nonsaturating", "minimax")
RESULT = "result.json"
# What a checkpoint's state, random streams and log hold (runs.Checkpoint), with their types.
STATE_TYPES = {"G": dict, "D": dict, "g_opt": dict, "d_opt": dict}
RNG_TYPES = {"data": Tensor, "latent": Tensor}
LOG_TYPES = {"losses": Tensor, "snapshots": list}
# What may change when a run is resumed: its length and how often it is checkpointed.
MAY_CHANGE = ("steps", "checkpoint_every")
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
    # Committed D updates per iteration, each an Adam step at d_lr on the iteration's minibatch (the one the K
    # look-ahead steps use): with K = 0 and d_steps = K' + 1 the step-matched control of K', the extra compute
    # committed instead of unrolled.
    d_steps: int = 1
    # With K = 1: G descends f_0 + alpha (f_1 - f_0), the one-step extrapolation of Sec. 4 (None: f_K, Eq. 9).
    alpha: Optional[float] = None
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
            (all(lr > 0 for lr in (self.d_lr, self.g_lr, 1.0 if self.unroll_lr is None else self.unroll_lr)),
             "learning rates must be > 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must lie in [0, 1), got {self.beta1}, "
                                                          f"{self.beta2}"),
            (self.g_loss in G_LOSSES, f"g_loss must be one of {G_LOSSES}, got {self.g_loss!r}"),
            (self.d_steps >= 1, f"d_steps must be >= 1, got {self.d_steps}"),
            (self.alpha is None or math.isfinite(self.alpha), f"alpha must be a finite number, got {self.alpha}"),
            (self.alpha is None or self.K == 1, f"alpha extrapolates one unrolled step: it needs K = 1, got "
                                                f"K = {self.K}"),
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


def _check_adam_state(name: str, optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Raise ``ValueError`` when a loaded Adam state does not fit ``module``'s parameters (torch takes moments of
    another shape without a word, and the run would fail at its next step, after it had begun)."""
    for param_name, param in module.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if key == "step":
                if not (isinstance(value, Tensor) and value.numel() == 1 and float(value) >= 0
                        and float(value) == round(float(value))):
                    raise ValueError(f"{name} step count of {param_name} is {runs.brief(value)}")
            elif not isinstance(value, Tensor) or value.shape != param.shape:
                raise ValueError(f"{name} {key} of {param_name} is {runs.brief(value)}, the parameter has shape "
                                 f"{tuple(param.shape)}")



# ----------------------------------------------------------------------------------------------- trainer


class GANTrainer:
    """Trains one :class:`ImageGAN` with :class:`GANConfig`; ``out_dir=None`` keeps everything in memory."""

    def __init__(self, gan: ImageGAN, cfg: GANConfig, out_dir: Optional[Path] = None, resume: bool = False,
                 device: str = "cpu", progress: bool = False, desc: str = "",
                 parallel: Optional[DataParallel] = None) -> None:
        cfg.validate()
        if parallel is not None and cfg.batch % parallel.world:
            raise ValueError(f"batch {cfg.batch} does not split evenly over {parallel.world} ranks")
        self.gan, self.cfg, self.device, self.parallel = gan, cfg, torch.device(device), parallel
        self.out_dir = None if out_dir is None else Path(out_dir)
        # Every rank trains and holds the same numbers; only rank 0 writes checkpoints and figures.
        self.writes = out_dir is not None and (parallel is None or parallel.writes)
        progress = progress and (parallel is None or parallel.writes)
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
        # <run>/samples_over_training.png while a long run trains (the script draws every run's at the end).
        self.figure_budget = FigureBudget(assumed_cost=1.0)
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
        options: Dict[str, Any] = dict(
            optimizer=self.unroll_opt or inner_opt,
            outer_fn=self.g_loss_at if self.cfg.g_loss == "nonsaturating" else None,
            transform_grads=None if self.parallel is None else self.parallel.mean)
        surrogate = (unroll.surrogate_loss(self.d_loss, self.cfg.K, **options) if self.cfg.alpha is None
                     else unroll.extrapolated_surrogate_loss(self.d_loss, self.cfg.alpha, **options))
        d_params = {name: p.detach() for name, p in self.D.named_parameters()}
        try:
            return surrogate(d_params, d_state, x, fake, buffers=dict(self.D.named_buffers()))
        except unroll.NonFiniteLossError as error:
            raise self._diverged(f"unrolled discriminator loss (unrolled step {error.step})", error.value) from error
        except FloatingPointError as error:  # all_reduce_mean: some rank's unrolled gradient, on every rank
            raise self._diverged("unrolled discriminator gradient", math.nan) from error

    # ----- one iteration -----
    def draw(self) -> Tuple[Tensor, Tensor]:
        """This iteration's real images and latents (CPU streams: the same numbers on every device); data-parallel,
        this rank's slice of the global minibatch (every rank draws all of it, so the streams stay in step)."""
        x = self.gan.sample_data(self.cfg.batch, self.data_gen)
        z = torch.randn(self.cfg.batch, self.gan.latent_dim, generator=self.latent_gen)
        if self.parallel is not None:
            x, z = self.parallel.shard(x, dim=0), self.parallel.shard(z, dim=0)
        return x.to(self.device), z.to(self.device)

    def _global(self, loss: Tensor) -> Tensor:
        """The loss of the global minibatch: the mean of the ranks' shard losses (the same on every rank, so a NaN
        on any rank stops every rank at the same check)."""
        return loss if self.parallel is None else self.parallel.mean_values({"loss": loss})["loss"]

    def _average_grads(self, module: nn.Module) -> None:
        if self.parallel is not None:
            unroll.distributed.all_reduce_grads_(dict(module.named_parameters()))

    def _average_batch_norm_statistics(self) -> None:
        """Running means become those of the global batch; running variances the mean of the shards' (without
        the spread between shards): the replicas stay identical, so every rank evaluates the same generator."""
        if self.parallel is None:
            return
        buffers = {f"{who}.{name}": b for who, module in (("G", self.G), ("D", self.D))
                   for name, b in module.named_buffers() if b.is_floating_point()}
        if buffers:
            with torch.no_grad():
                for name, mean in self.parallel.mean_values(buffers).items():
                    buffers[name].copy_(mean)

    def train_step(self) -> Tuple[float, float]:
        """``d_steps`` D updates then one G update; raises :class:`runs.Diverged` before stepping on a NaN/inf.
        Returns the first D update's loss and G's."""
        x, z = self.draw()
        fake = self.G(z)  # one forward pass serves both players
        d_loss_value = self._commit_discriminator(x, fake.detach())
        for _ in range(self.cfg.d_steps - 1):  # the controls' extra committed steps
            self._commit_discriminator(x, fake.detach())
        g_loss_value = self._commit("generator loss", self.unrolled_g_loss(x, fake), self.G, self.g_opt)
        self._average_batch_norm_statistics()
        # Finite losses do not prove a finite state: an Adam moment can overflow while the losses stay finite.
        found = runs.first_nonfinite({
            "generator parameters": dict(self.G.named_parameters()), "generator buffers": dict(self.G.named_buffers()),
            "discriminator parameters": dict(self.D.named_parameters()),
            "discriminator buffers": dict(self.D.named_buffers()),
            "generator Adam state": list(self.g_opt.state.values()),
            "discriminator Adam state": list(self.d_opt.state.values())})
        if found is not None:
            raise self._diverged(found[1], found[2])
        return float(d_loss_value.detach()), float(g_loss_value.detach())

    def _commit_discriminator(self, x: Tensor, fake: Tensor) -> Tensor:
        """One Adam step of D on the minibatch ``(x, fake)``; returns its loss before the step."""
        return self._commit("discriminator loss", self.d_loss(dict(self.D.named_parameters()), x, fake), self.D,
                            self.d_opt)

    def _commit(self, which: str, loss: Tensor, module: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
        """Check ``loss`` (averaged over ranks) is finite, then one optimizer step on its gradient (averaged over
        ranks); returns the averaged loss."""
        value = self._global(loss)
        self._check(which, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_grads(module)
        optimizer.step()
        return value

    def _check(self, which: str, value: Tensor) -> None:
        if not bool(torch.isfinite(value)):
            raise self._diverged(which, float(value.detach()))

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

    def _diverged(self, which: str, value: float) -> runs.Diverged:
        return runs.Diverged(self.step + 1, self.cfg.seed, which, value, self.checkpoint_path,
                                     self.checkpoint_step)

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
    def settings(self) -> Dict[str, Any]:
        """What defines the run's numbers: the configuration and the experiment's models."""
        return {**dataclasses.asdict(self.cfg), "model": self.gan.name}

    def _checkpoint(self) -> runs.Checkpoint:
        return runs.Checkpoint(
            self.settings(), self.step, self.train_seconds,
            {"G": self.G.state_dict(), "D": self.D.state_dict(), "g_opt": self.g_opt.state_dict(),
             "d_opt": self.d_opt.state_dict()},
            {"data": self.data_gen.get_state(), "latent": self.latent_gen.get_state()},
            {"losses": torch.tensor(self.losses, dtype=torch.float64).reshape(-1, 2), "snapshots": self.snapshots})

    def save_checkpoint(self) -> None:
        if not self.writes:
            if self.checkpoint_path is not None:
                self.checkpoint_step = self.step  # rank 0 wrote it: the same message on every rank
            return
        runs.write_checkpoint(self.checkpoint_path, self._checkpoint())
        self.checkpoint_step = self.step

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        # Read onto the CPU (the RNG states must stay CPU tensors; load_state_dict copies the rest onto the
        # device). Only the length of training and the checkpoint interval may change: anything else would mix
        # two runs.
        ckpt = runs.read_checkpoint(path, self.settings(), MAY_CHANGE, self.cfg.steps)
        assert path is not None
        for part, types in (("state", STATE_TYPES), ("rng", RNG_TYPES), ("log", LOG_TYPES)):
            contents = getattr(ckpt, part)
            for name, kind in types.items():
                runs.require(name in contents and runs.is_a(contents[name], kind), path,
                             f"its {part}'s {name} is {runs.brief(contents.get(name))}, not {runs.type_name(kind)}")
        losses = ckpt.log["losses"]
        runs.require(losses.shape == (ckpt.step, 2), path,
                     f"losses of shape {tuple(losses.shape)} for {ckpt.step} iterations")
        with runs.reading(path):
            self.G.load_state_dict(ckpt.state["G"])
            self.D.load_state_dict(ckpt.state["D"])
            for name, optimizer, module in (("g_opt", self.g_opt, self.G), ("d_opt", self.d_opt, self.D)):
                optimizer.load_state_dict(ckpt.state[name])
                _check_adam_state(name, optimizer, module)
            self.data_gen.set_state(ckpt.rng["data"])
            self.latent_gen.set_state(ckpt.rng["latent"])
            self.step = self.checkpoint_step = ckpt.step
            self.losses = [(float(d), float(g)) for d, g in losses.tolist()]
            self.snapshots = [(int(step), images) for step, images in ckpt.log["snapshots"]]
            self.train_seconds = ckpt.train_seconds

    # ----- the loop -----
    def iterate(self) -> None:
        """One iteration (:meth:`train_step`), its losses logged."""
        self.losses.append(self.train_step())

    def evaluate(self) -> None:
        """The samples of the fixed latents (Fig. 3's snapshots)."""
        self.snapshot()

    def checkpoint(self, evaluated: bool, done: bool) -> None:
        """The checkpoint; after an evaluation the samples-over-training figure too; at the end ``final.pt``, before
        the checkpoint (a kill between the two leaves the checkpoint short of the end, so the resumed run finishes
        and exports again; the other way round, a finished run could be left without its export)."""
        if self.writes and evaluated:
            self.figure_budget.draw(self.save_figure)
        if self.writes and done:
            assert self.out_dir is not None
            runs.write_final(self.out_dir / runs.FINAL, self._checkpoint())
        self.save_checkpoint()

    def postfix(self) -> Dict[str, str]:
        """The last iteration's losses."""
        if not self.losses:
            return {}
        d_loss, g_loss = self.losses[-1]
        return {"d_loss": f"{d_loss:.3f}", "g_loss": f"{g_loss:.3f}"}

    def run(self) -> None:
        """Train to ``cfg.steps`` iterations from where a resumed run stands (:func:`loop.train`: snapshots every
        ``snapshot_every`` iterations, checkpoints then and every ``checkpoint_every``)."""
        loop.train(self, self.cfg.steps, self.cfg.snapshot_every, self.cfg.checkpoint_every, desc=self.desc,
                   progress=self.progress)

    def save_figure(self) -> None:
        """``<run>/samples_over_training.png``: the snapshots so far (Fig. 3-style, one row)."""
        assert self.out_dir is not None
        plot_samples_over_training([(f"seed {self.cfg.seed}", self.snapshots)],
                                   self.out_dir / "samples_over_training.png",
                                   title=f"{self.gan.name}, K={self.cfg.K}: samples of fixed latents (iterations)")

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


# What the forked workers of run_experiment read: set just before the fork, inherited by the children.
_WORK: Dict[str, Any] = {}


def _train_one(index: int) -> List[str]:
    """Worker: train and evaluate run ``index`` of the job in ``_WORK``; returns its log lines."""
    job = _WORK
    torch.set_num_threads(job["threads"])
    lines: List[str] = []
    run_experiment([job["specs"][index]], job["out_dir"], job["evaluate"], job["resume"], job["device"],
                   progress=False, log=lines.append, eval_settings=job["eval_settings"])
    return lines


def _train_in_workers(specs: Sequence[RunSpec], out_dir: Path, evaluate: Evaluate, resume: bool, device: str,
                      workers: int, progress: bool, log: Callable[[str], None],
                      eval_settings: Mapping[str, Any]) -> None:
    """Train and evaluate every run in ``workers`` forked processes (:func:`runs.run_in_workers`, each with the
    caller's torch thread count), costliest (most D steps, unrolled or committed) first; each run writes its
    checkpoint and ``result.json`` as in the sequential loop. The first error (or Ctrl-C) stops the other workers
    at once, and the workers stop if this process dies; their checkpoints are written atomically, so ``--resume``
    goes on."""
    from tqdm import tqdm

    order = sorted(range(len(specs)), key=lambda i: -(specs[i].cfg.K + specs[i].cfg.d_steps))
    workers = min(workers, len(specs))
    _WORK.update(specs=list(specs), out_dir=Path(out_dir), evaluate=evaluate, resume=resume, device=device,
                 threads=torch.get_num_threads(), eval_settings=dict(eval_settings))
    try:
        with tqdm(total=len(specs), disable=not progress, desc=f"runs ({workers} workers)") as bar:
            def report(lines: List[str]) -> None:
                bar.update(1)
                for line in lines:
                    bar.write(line) if progress else log(line)

            runs.run_in_workers(_train_one, order, workers, report)
    finally:
        _WORK.clear()


def _check_runs(specs: Sequence[RunSpec], out_dir: Path, device: str, eval_settings: Mapping[str, Any]) -> None:
    """Every run's stored result and the checkpoints a resume will read, read as it reads them, before any run
    trains or writes: a damaged file is refused (:class:`runs.RunError`) with nothing changed, not after other
    runs were trained. (A diverged run's checkpoint is not read: its stored result is reused.)"""
    for spec in specs:
        run_dir = Path(out_dir) / spec.folder
        cached = runs.read_json_file(run_dir / RESULT)
        if not _reusable(cached, "diverged", spec.cfg, eval_settings) and (run_dir / CHECKPOINT).is_file():
            GANTrainer(spec.gan, spec.cfg, run_dir, resume=True, device=device)  # reads; writes nothing


def _reusable(cached: Optional[Mapping[str, Any]], status: str, cfg: GANConfig, eval_settings: Mapping[str, Any],
              step: Optional[int] = None) -> bool:
    """Whether a run's stored ``result.json`` was made by exactly these settings (and, if given, at ``step``)."""
    return cached is not None and cached.get("status") == status \
        and not runs.setting_differences(cached.get("config", {}), dataclasses.asdict(cfg)) \
        and not runs.setting_differences(cached.get("eval_settings", {}), eval_settings) \
        and (step is None or cached.get("step") == step)


def run_experiment(specs: Sequence[RunSpec], out_dir: Path, evaluate: Evaluate, resume: bool = False,
                   device: str = "cpu", progress: bool = False, log: Callable[[str], None] = print,
                   workers: int = 1, eval_settings: Optional[Mapping[str, Any]] = None,
                   parallel: Optional[DataParallel] = None) -> Tuple[List[Dict[str, Any]], Dict[str, GANTrainer]]:
    """Train and evaluate every run; returns ``(records, trainers)``, the trainers of the first finished run of
    every table cell (by folder; the others are dropped to bound memory).

    Each run lives in ``out_dir/<spec.folder>/`` (``checkpoint.pt``, ``result.json``). With ``resume``, finished
    runs are reloaded and an interrupted one continues from its checkpoint; a stored evaluation is reused only when
    the run's configuration, its iteration and every one of ``eval_settings`` (what else the evaluation depends on:
    sample counts, targets, ...) match. A run that diverges is recorded with ``status: "diverged"`` (its last good
    checkpoint kept) and the others go on. ``workers > 1`` trains the runs in that many forked CPU processes (with
    this process's thread count) and then reloads them here; every run's numbers are the same as with one worker.
    The caller holds ``out_dir`` (:func:`runs.claim`). With ``parallel`` (``torchrun``) every rank trains and
    evaluates every run on its shards and rank 0 alone writes; it needs ``workers == 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if parallel is not None and workers != 1:
        raise ValueError(f"workers must be 1 under torchrun (the ranks are the parallelism), got {workers}")
    writes = parallel is None or parallel.writes
    eval_settings = dict(eval_settings or {})
    if resume:
        _check_runs(specs, out_dir, device, eval_settings)
    if workers > 1 and len(specs) > 1:
        _train_in_workers(specs, out_dir, evaluate, resume, device, workers, progress, log, eval_settings)
        resume, progress, log = True, False, lambda line: None  # the runs are done: reload them quietly
    records: List[Dict[str, Any]] = []
    trainers: Dict[str, GANTrainer] = {}
    for i, spec in enumerate(specs):
        run_dir = Path(out_dir) / spec.folder
        cached = runs.read_json_file(run_dir / RESULT) if resume else None
        if _reusable(cached, "diverged", spec.cfg, eval_settings):
            records.append(cached)  # training is deterministic: it would diverge at the same iteration again
            continue
        trainer = GANTrainer(spec.gan, spec.cfg, run_dir, resume=resume and (run_dir / CHECKPOINT).is_file(),
                             device=device, progress=progress, desc=f"[{i + 1}/{len(specs)}] {spec.label} "
                                                                    f"seed={spec.cfg.seed}", parallel=parallel)
        base = {"run": spec.folder, **dict(spec.key), "seed": spec.cfg.seed, "eval_settings": eval_settings}
        try:
            trainer.run()
        except runs.Diverged as error:
            log(f"{spec.folder}: {error}")
            record = {**base, "status": "diverged", "diverged_at": error.step, "error": str(error),
                      **trainer.summary()}
            if writes:
                runs.write_json(run_dir / RESULT, record)
            records.append(record)
            continue
        if not any(other.label == spec.label for other in specs if other.folder in trainers):
            trainers[spec.folder] = trainer  # only the first finished run of each cell, for the figures
        if _reusable(cached, "done", spec.cfg, eval_settings, trainer.step):
            records.append(cached)
            continue
        start = time.perf_counter()
        metrics = evaluate(trainer, spec, run_dir)
        record = {**base, "status": "done", **metrics, **trainer.summary(),
                  "eval_seconds": round(time.perf_counter() - start, 2)}
        if writes:
            runs.write_json(run_dir / RESULT, record)
        records.append(record)
        log(f"{spec.folder}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in metrics.items() if isinstance(v, (int, float))))
    return records, trainers
