"""A multi-seed GAN training loop on 2-D mixtures: one pure iteration, ``torch.func.vmap``-ed over seeds.

Everything a seed needs lives in a stacked pytree (parameters and Adam states of both players, plus an optional
``extra`` dict for hooks); every random number (data batches, latents) is drawn outside ``vmap`` from per-seed
``torch.Generator`` streams, so seed ``s`` gives the same numbers alone or in a batch of seeds, and for every K
(paired seeds: the init and the main data stream do not depend on K or on the other flags).

Reusable pieces: :class:`TrainConfig`, :func:`make_iteration` (the pure step, with :class:`Hooks` for the App. B
ablations), :class:`Trainer` (streams, evaluation, checkpoints, outputs), :func:`plot_density_grid`.
Only names in ``unroll.__all__`` are used.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import unroll
from data import Mixture, make_mixture
from metrics import METRIC_NAMES, all_metrics
from models import (LATENT_DIM, d_loss_from_logits, discriminator_forward, generator_forward, init_discriminator,
                    init_generator, nonsaturating_g_loss)

TrainState = Dict[str, Any]
"""``{"g", "d": params, "g_opt", "d_opt": Adam states, "extra": dict}``; stacked over seeds in :class:`Trainer`."""

Batch = Dict[str, Tensor]

LOSSES = ("saturating", "nonsaturating")
UNROLL_BATCHES = ("fixed", "resampled")
CHECKPOINT = "checkpoint.pt"
# Streams of per-seed generators; the seed of stream j for run seed s is s * _STREAMS + j.
_STREAMS = 16
_INIT, _MAIN, _EXTRA, _EVAL = 0, 1, 2, 3
_REFERENCE_SEED = 999_983  # data samples the energy distance compares against; shared by all seeds


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration. An *iteration* is one discriminator update then ``g_steps`` generator updates
    (the paper counts each network update as a step, so its 25,000 steps are ~12,500 of our iterations)."""

    dataset: str = "ring"
    weight_std: float = 0.0
    weight_seed: int = 0
    K: int = 0
    stop_grad: bool = False
    average_over_steps: bool = False
    unroll_batches: str = "fixed"
    control: bool = False
    g_steps: int = 1
    steps: int = 5000
    d_lr: float = 1e-4
    g_lr: float = 1e-4
    unroll_lr: Optional[float] = None
    beta1: float = 0.5
    beta2: float = 0.999
    activation: str = "relu"
    loss: str = "saturating"
    batch: int = 512
    eval_every: int = 500
    eval_samples: int = 10_000

    @property
    def lookahead_lr(self) -> float:
        """Learning rate of the unrolled (and, with ``control``, the extra committed) discriminator steps."""
        return self.d_lr if self.unroll_lr is None else self.unroll_lr

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        checks = [
            (self.K >= 0, f"K must be >= 0, got {self.K}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.g_steps >= 1, f"g_steps must be >= 1, got {self.g_steps}"),
            (self.batch >= 2, f"batch must be >= 2, got {self.batch}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.eval_samples >= 100, f"eval_samples must be >= 100, got {self.eval_samples}"),
            (self.weight_std >= 0, f"weight_std must be >= 0, got {self.weight_std}"),
            (all(lr > 0 for lr in (self.d_lr, self.g_lr, self.lookahead_lr)), "learning rates must be > 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.unroll_batches in UNROLL_BATCHES, f"unroll_batches must be one of {UNROLL_BATCHES}"),
            (self.activation in ("relu", "tanh"), f"activation must be relu or tanh, got {self.activation!r}"),
            (not (self.control and (self.stop_grad or self.average_over_steps)),
             "control runs do not unroll: stop_grad / average_over_steps make no sense with control"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        make_mixture(self.dataset)  # unknown dataset -> ValueError


@dataclass
class Hooks:
    """Extension points for the App. B ablations; the defaults give the plain / unrolled GAN.

    - ``init_extra(d_params) -> extra``: per-seed extra state (e.g. a history of discriminators), a dict of
      tensors; it is stacked, vmapped, checkpointed with the rest.
    - ``after_d_step(extra, d_params, d_opt_state) -> extra``: called after every discriminator update.
    - ``generator_loss(extra, d_params, d_opt_state, x, fake) -> scalar``: replaces the unrolled surrogate.
    """

    init_extra: Optional[Callable[[Dict[str, Tensor]], Dict[str, Tensor]]] = None
    after_d_step: Optional[Callable[..., Dict[str, Tensor]]] = None
    generator_loss: Optional[Callable[..., Tensor]] = None


def _betas(cfg: TrainConfig) -> Tuple[float, float]:
    return (cfg.beta1, cfg.beta2)


def d_inner_loss(d_params: Dict[str, Tensor], x: Tensor, fake: Tensor, *unused: Tensor) -> Tensor:
    """L_D on real ``x`` and generated ``fake`` points; extra arguments (re-sampled batches) are ignored."""
    # One forward over [real; fake]: half the number of ops of two passes (the unroll is op-overhead bound).
    logits = discriminator_forward(d_params, torch.cat([x, fake]))
    return d_loss_from_logits(logits[:x.shape[0]], logits[x.shape[0]:])


def _nonsaturating_outer(d_params: Dict[str, Tensor], x: Tensor, fake: Tensor, *unused: Tensor) -> Tensor:
    return nonsaturating_g_loss(discriminator_forward(d_params, fake))


def _resampled_step_args(k: int, x: Tensor, fake: Tensor, u_x: Tensor, u_fake: Tensor) -> Tuple[Tensor, ...]:
    return (u_x[k], u_fake[k], u_x, u_fake)


def make_surrogate(cfg: TrainConfig) -> Callable[..., Tensor]:
    """The generator's loss ``surrogate(d_params, d_opt_state, x, fake[, u_x, u_fake])`` (public unroll API)."""
    return unroll.surrogate_loss(
        d_inner_loss, 0 if cfg.control else cfg.K, cfg.stop_grad,
        optimizer=unroll.adam(cfg.lookahead_lr, betas=_betas(cfg)),
        outer_fn=None if cfg.loss == "saturating" else _nonsaturating_outer,
        step_args=_resampled_step_args if cfg.unroll_batches == "resampled" else None,
        average_over_steps=cfg.average_over_steps)


def make_iteration(cfg: TrainConfig, hooks: Optional[Hooks] = None
                   ) -> Callable[[TrainState, Batch], Tuple[TrainState, Dict[str, Tensor]]]:
    """The pure training iteration ``(state, batch) -> (state, {"d_loss", "g_loss"})`` for ONE seed.

    As in the reference implementation, both players see the same minibatch ``(x[0], G(z[0]))``: D takes one
    Adam step at ``d_lr`` on it (with ``control``, then K more at ``lookahead_lr``: on the same batch if
    ``unroll_batches == "fixed"``, else on ``c_x, G(c_z)``); then G takes ``g_steps`` Adam steps (step j on
    ``x[j], z[j]``), each on the unrolled surrogate, whose K look-ahead steps start from D's current Adam state.
    G's forward pass is shared between the D step and the first G step (``torch.func.vjp``), so G costs one
    forward and one backward per generator step.
    """
    hooks = hooks or Hooks()
    d_opt = unroll.adam(cfg.d_lr, betas=_betas(cfg))
    g_opt = unroll.adam(cfg.g_lr, betas=_betas(cfg))
    look_opt = unroll.adam(cfg.lookahead_lr, betas=_betas(cfg))
    surrogate = make_surrogate(cfg)
    d_grad = torch.func.grad_and_value(d_inner_loss)
    resampled_unroll = cfg.unroll_batches == "resampled" and cfg.K > 0 and not cfg.control \
        and hooks.generator_loss is None
    act = cfg.activation

    def fake_loss(fake: Tensor, d: Dict[str, Tensor], d_state: Dict[str, Any], extra: Dict[str, Tensor],
                  x: Tensor, u_x: Optional[Tensor]) -> Tensor:
        """The generator's loss as a function of its samples (the look-ahead batches' samples appended)."""
        if hooks.generator_loss is not None:
            return hooks.generator_loss(extra, d, d_state, x, fake)
        if u_x is not None:
            n_main = x.shape[0]
            u_fake = fake[n_main:].reshape(u_x.shape)
            return surrogate(d, d_state, x, fake[:n_main], u_x, u_fake)
        return surrogate(d, d_state, x, fake)

    fake_grad = torch.func.grad_and_value(fake_loss)

    def d_update(d: Dict[str, Tensor], d_state: Dict[str, Any], x: Tensor, fake: Tensor,
                 opt: unroll.Optimizer) -> Tuple[Dict[str, Tensor], Dict[str, Any], Tensor]:
        grads, value = d_grad(d, x, fake)
        d, d_state = opt.apply(d, grads, d_state)
        return d, d_state, value

    def iteration(state: TrainState, batch: Batch) -> Tuple[TrainState, Dict[str, Tensor]]:
        g, d, g_state, d_state, extra = state["g"], state["d"], state["g_opt"], state["d_opt"], state["extra"]
        g_loss = d_loss = None
        for j in range(cfg.g_steps):
            x, z = batch["x"][j], batch["z"][j]
            u_x = None
            if resampled_unroll:
                u_x = batch["u_x"][j]
                z = torch.cat([z, batch["u_z"][j].reshape(-1, z.shape[-1])])
            fake, g_vjp = torch.func.vjp(lambda g_: generator_forward(g_, z, act), g)
            if j == 0:
                main_fake = fake[:x.shape[0]]
                d, d_state, d_loss = d_update(d, d_state, x, main_fake, d_opt)
                if cfg.control:
                    for k in range(cfg.K):
                        x_k, fake_k = ((batch["c_x"][k], generator_forward(g, batch["c_z"][k], act))
                                       if cfg.unroll_batches == "resampled" else (x, main_fake))
                        d, d_state, _ = d_update(d, d_state, x_k, fake_k, look_opt)
                if hooks.after_d_step is not None:
                    extra = hooks.after_d_step(extra, d, d_state)
            grad_fake, g_loss = fake_grad(fake, d, d_state, extra, x, u_x)
            (grads,) = g_vjp(grad_fake)
            g, g_state = g_opt.apply(g, grads, g_state)
        new_state = {"g": g, "d": d, "g_opt": g_state, "d_opt": d_state, "extra": extra}
        return new_state, {"d_loss": d_loss, "g_loss": g_loss}

    return iteration


def init_state(cfg: TrainConfig, seed: int, hooks: Optional[Hooks] = None) -> TrainState:
    """Seed ``seed``'s initial parameters and fresh Adam states; independent of K and every other flag."""
    gen = torch.Generator().manual_seed(seed * _STREAMS + _INIT)
    g, d = init_generator(gen), init_discriminator(gen)
    opt = unroll.adam(cfg.d_lr, betas=_betas(cfg))  # the state layout does not depend on the lr
    extra = hooks.init_extra(d) if hooks is not None and hooks.init_extra is not None else {}
    return {"g": g, "d": d, "g_opt": opt.init(g), "d_opt": opt.init(d), "extra": extra}


def stack_states(states: Sequence[Any]) -> Any:
    """Stack a list of identical pytrees of tensors along a new leading (seed) dimension."""
    first = states[0]
    if isinstance(first, dict):
        return {k: stack_states([s[k] for s in states]) for k in first}
    return torch.stack(list(states))


def index_state(tree: Any, i: int) -> Any:
    """Seed ``i``'s slice of a stacked pytree."""
    if isinstance(tree, dict):
        return {k: index_state(v, i) for k, v in tree.items()}
    return tree[i]


def _all_finite(tree: Any) -> bool:
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    return bool(torch.isfinite(tree).all())


class TrainingDiverged(FloatingPointError):
    """A loss became NaN or infinite; ``step`` is the 1-based iteration, ``seed`` the run seed."""

    def __init__(self, step: int, seed: int, which: str, value: float) -> None:
        super().__init__(f"training diverged: non-finite {which} ({value}) at iteration {step} for seed {seed}; "
                         f"the last good checkpoint and metrics are kept")
        self.step, self.seed, self.which, self.value = step, seed, which, value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_records(records: List[Dict[str, Any]], meta: Dict[str, Any], out_dir: Path) -> None:
    """``metrics.json`` (meta + records) and ``metrics.csv`` (one row per eval step and seed)."""
    atomic_write_bytes(out_dir / "metrics.json", json.dumps({**meta, "records": records}, indent=1).encode())
    text = io.StringIO()
    if records:
        writer = csv.DictWriter(text, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    atomic_write_bytes(out_dir / "metrics.csv", text.getvalue().encode())


def histogram_extent(mixture: Mixture) -> float:
    """Half-width of the square the density figures show."""
    return float(mixture.centers.abs().max()) + 1.0


def density_histogram(samples: Tensor, extent: float, bins: int = 100) -> Tensor:
    """2-D histogram counts [bins, bins] (x along rows) of ``samples`` inside [-extent, extent]^2."""
    finite = samples[torch.isfinite(samples).all(dim=1)].float()
    hist, _ = torch.histogramdd(finite, bins=[bins, bins], range=[-extent, extent, -extent, extent])
    return hist.to(torch.int32)


def _smooth(hist: Tensor, sigma_bins: float = 1.0) -> Tensor:
    radius = int(3 * sigma_bins)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_bins) ** 2)
    kernel = kernel / kernel.sum()
    image = hist.double()[None, None]
    image = torch.nn.functional.conv2d(image, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    image = torch.nn.functional.conv2d(image, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return image[0, 0]


def plot_density_grid(rows: Sequence[Tuple[str, Sequence[Tuple[int, Tensor]]]], data_hist: Tensor, extent: float,
                      path: Path, max_cols: int = 8, title: str = "") -> None:
    """Fig. 2-style grid: one row per run (label, [(step, hist), ...]); the last column is the data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cols = min(max_cols, max(len(snaps) for _, snaps in rows)) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.6 * len(rows) + 0.4), squeeze=False)
    for r, (label, snaps) in enumerate(rows):
        # Evenly spaced snapshots, always including the last one.
        picks = sorted({round(i * (len(snaps) - 1) / max(n_cols - 2, 1)) for i in range(n_cols - 1)})
        panels = [(f"{snaps[i][0]}", snaps[i][1]) for i in picks] + [("data", data_hist)]
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(panels) - 1 and c != n_cols - 1:
                ax.axis("off")
                continue
            name, hist = panels[-1] if c == n_cols - 1 else panels[c]
            # A light blur (a KDE on the histogram grid, as the paper's heatmaps) and sqrt scaling keep narrow,
            # low-mass modes visible; transpose so x runs left to right.
            ax.imshow(_smooth(hist).sqrt().t().numpy(), origin="lower", cmap="viridis",
                      extent=(-extent, extent, -extent, extent), interpolation="bilinear")
            if r == 0:
                ax.set_title(name, fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    # Leave the title its own strip above the column labels.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    # A 64-colour palette shrinks the noisy heatmaps about five-fold, with no visible change.
    from PIL import Image
    buffer.seek(0)
    small = io.BytesIO()
    Image.open(buffer).convert("RGB").quantize(colors=64).save(small, format="PNG", optimize=True)
    atomic_write_bytes(Path(path), small.getvalue())


class Trainer:
    """Trains ``cfg`` for every seed in ``seeds`` at once; evaluates, checkpoints and writes outputs.

    ``out_dir=None`` keeps everything in memory (tests, benchmarks). ``resume=True`` continues from
    ``out_dir/checkpoint.pt`` and ends with exactly the numbers of an uninterrupted run.
    """

    def __init__(self, cfg: TrainConfig, seeds: Sequence[int], out_dir: Optional[Path] = None,
                 hooks: Optional[Hooks] = None, resume: bool = False, progress: bool = False,
                 figure_seeds: int = 4) -> None:
        cfg.validate()
        seeds = [int(s) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
        self.cfg, self.seeds, self.hooks = cfg, seeds, hooks
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress, self.figure_seeds = progress, figure_seeds
        self.mixture = make_mixture(cfg.dataset, cfg.weight_std, cfg.weight_seed)
        self.extent = histogram_extent(self.mixture)
        self.reference = self.mixture.sample(max(cfg.eval_samples, 2000),
                                             torch.Generator().manual_seed(_REFERENCE_SEED))
        self.step_fn = torch.func.vmap(make_iteration(cfg, hooks))
        self.streams = {name: [torch.Generator().manual_seed(s * _STREAMS + j) for s in seeds]
                        for name, j in (("main", _MAIN), ("extra", _EXTRA))}
        # vmap over a batch of one takes other reduction kernels than over >= 2 (last-bit differences in the
        # bias gradients), so a lone seed is run next to a copy of itself to give the numbers it gets in a batch.
        self._copies = 2 if len(seeds) == 1 else 1
        self.state = stack_states([init_state(cfg, s, hooks) for s in seeds] * self._copies)
        self.step = 0
        self.records: List[Dict[str, Any]] = []
        self.snapshots: List[Tuple[int, Tensor]] = []  # (step, int32 histograms [S, bins, bins])
        self.last_losses: Optional[Dict[str, Tensor]] = None
        self.diverged: Optional[Dict[str, Any]] = None
        if resume:
            self._load_checkpoint()

    # ----- randomness (outside vmap, per seed) -----
    def _draw(self, s: int) -> Batch:
        cfg, mixture = self.cfg, self.mixture
        main, extra = self.streams["main"][s], self.streams["extra"][s]

        def xz(gen: torch.Generator, *lead: int) -> Tuple[Tensor, Tensor]:
            n = math.prod(lead) * cfg.batch
            x = mixture.sample(n, gen).reshape(*lead, cfg.batch, 2)
            z = torch.randn(n, LATENT_DIM, generator=gen).reshape(*lead, cfg.batch, LATENT_DIM)
            return x, z

        batch: Batch = {}
        # The main stream's consumption depends only on batch and g_steps, never on K: paired seeds.
        batch["x"], batch["z"] = xz(main, cfg.g_steps)
        if cfg.unroll_batches == "resampled" and cfg.K > 0:
            if cfg.control:
                batch["c_x"], batch["c_z"] = xz(extra, cfg.K)
            elif self.hooks is None or self.hooks.generator_loss is None:
                batch["u_x"], batch["u_z"] = xz(extra, cfg.g_steps, cfg.K)
        return batch

    def draw_batch(self) -> Batch:
        """This iteration's random inputs, stacked over seeds."""
        return stack_states([self._draw(i) for i in range(len(self.seeds))] * self._copies)

    # ----- evaluation -----
    def generator_samples(self, i: int, n: Optional[int] = None) -> Tensor:
        """``n`` (default ``eval_samples``) generator samples of seed index ``i``, from fixed per-seed latents."""
        n = self.cfg.eval_samples if n is None else n
        gen = torch.Generator().manual_seed(self.seeds[i] * _STREAMS + _EVAL)
        z = torch.randn(n, LATENT_DIM, generator=gen)
        with torch.no_grad():
            return generator_forward(index_state(self.state["g"], i), z, self.cfg.activation)

    def evaluate(self) -> List[Dict[str, Any]]:
        """Metrics of every seed at the current step; appended to ``records`` and snapshotted for the figure."""
        records, hists = [], []
        m = self.mixture
        for i, seed in enumerate(self.seeds):
            samples = self.generator_samples(i)
            metrics = all_metrics(samples, self.reference, m.centers, m.std, m.weights)
            losses = {k: (float(v[i]) if self.last_losses is not None else float("nan"))
                      for k, v in (self.last_losses or {"d_loss": None, "g_loss": None}).items()}
            records.append({"step": self.step, "seed": seed, **metrics, **losses})
            hists.append(density_histogram(samples, self.extent))
        self.records.extend(records)
        self.snapshots.append((self.step, torch.stack(hists)))
        return records

    # ----- checkpoints and outputs -----
    def _meta(self, status: str) -> Dict[str, Any]:
        return {"status": status, "config": dataclasses.asdict(self.cfg), "seeds": self.seeds,
                "step": self.step, "diverged": self.diverged, "metric_names": list(METRIC_NAMES)}

    def _save_checkpoint(self) -> None:
        assert self.out_dir is not None
        atomic_torch_save({
            "config": dataclasses.asdict(self.cfg), "seeds": self.seeds, "step": self.step, "state": self.state,
            "rng": {name: [g.get_state() for g in gens] for name, gens in self.streams.items()},
            "records": self.records, "snapshots": self.snapshots, "last_losses": self.last_losses,
        }, self.out_dir / CHECKPOINT)

    def _load_checkpoint(self) -> None:
        if self.out_dir is None or not (self.out_dir / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {self.out_dir}")
        ckpt = torch.load(self.out_dir / CHECKPOINT, weights_only=False)
        saved = dict(ckpt["config"])
        now = dataclasses.asdict(self.cfg)
        # Only the length of training may change on resume; anything else would silently mix two runs.
        different = sorted(k for k in now if k != "steps" and saved.get(k) != now[k])
        if different or ckpt["seeds"] != self.seeds:
            raise ValueError(f"--resume: the checkpoint in {self.out_dir} was made with other settings "
                             f"({', '.join(different) or 'seeds'}); use the same flags or another output folder")
        self.state, self.step, self.records = ckpt["state"], ckpt["step"], ckpt["records"]
        self.snapshots, self.last_losses = ckpt["snapshots"], ckpt["last_losses"]
        for name, gens in self.streams.items():
            for g, rng_state in zip(gens, ckpt["rng"][name]):
                g.set_state(rng_state)

    def write_outputs(self, status: str) -> None:
        if self.out_dir is None:
            return
        write_records(self.records, self._meta(status), self.out_dir)

    def save_figure(self, path: Optional[Path] = None) -> None:
        """Rows = the first ``figure_seeds`` seeds, columns = evaluation steps, last column the data."""
        if self.out_dir is None and path is None:
            return
        rows = [(f"seed {seed}", [(step, hist[i]) for step, hist in self.snapshots])
                for i, seed in enumerate(self.seeds[:self.figure_seeds])]
        data_hist = density_histogram(self.reference, self.extent)
        cfg = self.cfg
        kind = "control" if cfg.control else f"K={cfg.K}"
        plot_density_grid(rows, data_hist, self.extent, path or self.out_dir / "density.png",
                          title=f"{cfg.dataset}, {kind}, unroll lr {cfg.lookahead_lr:g}, {cfg.activation}, "
                                f"{cfg.loss}")

    # ----- the loop -----
    def _check_finite(self, losses: Dict[str, Tensor]) -> None:
        for which, values in losses.items():
            bad = ~torch.isfinite(values[:len(self.seeds)])
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                self.diverged = {"step": self.step + 1, "seed": self.seeds[i], "which": which,
                                 "value": float(values[i])}
                raise TrainingDiverged(self.step + 1, self.seeds[i], which, float(values[i]))

    def _postfix(self) -> Dict[str, str]:
        latest = [r for r in self.records if r["step"] == self.step] or self.records[-len(self.seeds):]
        mean = lambda k: sum(r[k] for r in latest) / len(latest)  # noqa: E731
        return {"step@eval": str(latest[0]["step"]), "modes": f"{mean('modes'):.2f}",
                "hq": f"{100 * mean('hq'):.1f}%", "rkl": f"{mean('reverse_kl'):.3f}"}

    def run(self) -> List[Dict[str, Any]]:
        """Train to ``cfg.steps`` iterations; returns the metric records. Raises :class:`TrainingDiverged`."""
        from tqdm import tqdm

        cfg = self.cfg
        if self.step == 0 and not self.records:
            self.evaluate()
            self._checkpoint_and_write("running")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{cfg.dataset} {'control' if cfg.control else 'K'}={cfg.K}", mininterval=1.0)
        bar.set_postfix(self._postfix())
        try:
            while self.step < cfg.steps:
                self.state, losses = self.step_fn(self.state, self.draw_batch())
                try:
                    self._check_finite(losses)
                except TrainingDiverged:
                    self.write_outputs("diverged")  # metrics so far; the checkpoint stays the last good one
                    raise
                self.step += 1
                self.last_losses = losses
                bar.update(1)
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    if not _all_finite(self.state):
                        self.diverged = {"step": self.step, "seed": None, "which": "parameters", "value": None}
                        self.write_outputs("diverged")
                        raise TrainingDiverged(self.step, -1, "parameters", float("nan"))
                    self.evaluate()
                    self._checkpoint_and_write("running" if self.step < cfg.steps else "done")
                    bar.set_postfix(self._postfix())
        finally:
            bar.close()
        return self.records

    def _checkpoint_and_write(self, status: str) -> None:
        if self.out_dir is None:
            return
        self._save_checkpoint()
        self.write_outputs(status)
        if status == "done":
            self.save_figure()
