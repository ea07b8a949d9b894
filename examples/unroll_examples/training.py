"""A multi-seed GAN training loop on 2-D mixtures: one pure iteration, ``torch.func.vmap``-ed over seeds.

Everything a seed needs lives in a stacked pytree (parameters and Adam states of both players, plus an optional
``extra`` dict for a generator rule's own state); every random number (data batches, latents) is drawn outside
``vmap`` from per-seed ``torch.Generator`` streams, so seed ``s`` gives the same numbers alone or in a batch of
seeds, and for every K (paired seeds: the init and the main data stream do not depend on K or on the other flags).

Reusable pieces: :class:`TrainConfig`; the rules of an iteration, one small object per variation (G's gradient:
:class:`PlainGAN`, :class:`Unrolled`; D's update: :class:`PlainD`, :class:`ControlD`; chosen from the config by
:func:`generator_rule` and :func:`discriminator_rule`, or given as :class:`Strategies` by the App. B and Sec. 4
experiments); :func:`make_iteration` (the pure step that calls them); :class:`Trainer` (streams, evaluation,
checkpoints and outputs through :mod:`runs`); :func:`run_name`. Only names in ``unroll.__all__`` are used.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

import unroll

from . import cli, loop, runs
from .cli import MAX_SEEDS, option
from .data import DATASETS, make_mixture
from .metrics import METRIC_NAMES, all_metrics
from .models import (
    ACTIVATIONS,
    D_INITS,
    HIDDEN,
    LATENT_DIM,
    d_loss_from_logits,
    discriminator_forward,
    generator_forward,
    init_discriminator,
    init_generator,
    nonsaturating_g_loss,
)
from .parallel import DataParallel
from .plotting import FigureBudget, density_histogram, histogram_extent, plot_density_grid
from .runs import CHECKPOINT

TrainState = Dict[str, Any]
"""``{"g", "d": params, "g_opt", "d_opt": Adam states, "extra": dict}``; stacked over seeds in :class:`Trainer`."""

Batch = Dict[str, Tensor]
GradMean = Callable[[Dict[str, Tensor]], Dict[str, Tensor]]
"""Averages a gradient dict over data-parallel ranks (``unroll.distributed.all_reduce_mean()``)."""

LOSSES = ("saturating", "nonsaturating")
UNROLL_BATCHES = ("fixed", "resampled")
# Streams of per-seed generators; the seed of stream j for run seed s is s * _STREAMS + j.
_STREAMS = 16
_INIT, _MAIN, _EXTRA, _EVAL = 0, 1, 2, 3
_REFERENCE_SEED = 999_983  # data samples the energy distance compares against; shared by all seeds


# Lower bounds of the memory one unit of a size flag takes (float32), for cli.sized: refused at the command line
# when the machine has less. A sample: its latent, a data point and the generator's activations.
_SAMPLE_BYTES = 4 * (LATENT_DIM + 2 * HIDDEN + 2 + 2)
_D_BYTES = 4 * 4 * ((2 + 1) * HIDDEN + HIDDEN + 1)  # D's parameters, gradient and two Adam moments
SIZE_FLAGS = {
    "batch": cli.sized(_SAMPLE_BYTES, "minibatch sample"),
    "eval_samples": cli.sized(_SAMPLE_BYTES, "evaluation sample"),
    "g_steps": cli.sized(2 * _SAMPLE_BYTES, "generator step, whose minibatch has at least 2 samples"),
    "K": cli.sized(_D_BYTES, "unrolled step, which keeps a copy of D and its Adam state"),
    "ensemble": cli.sized(_D_BYTES // 4, "discriminator kept"),
}
"""argparse types of the mixture scripts' size flags (``--batch``, ``--eval-samples``, ``--g-steps``, ``--K`` and
its lists, ``historical_averaging.py --sizes``)."""


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration. An *iteration* is one discriminator update then ``g_steps`` generator updates
    (the paper counts each network update as a step, so its 25,000 steps are ~12,500 of our iterations)."""

    # Each field's help text and command-line validator sit next to it: cli.add_config_flags makes the flags.
    dataset: str = option("ring", "the 2-D mixture", choices=DATASETS)
    weight_std: float = option(0.0, "std of the non-uniform mode weights (0 = uniform; the PyTorch port's "
                                    "prior_std)", type=cli.nonnegative_float)
    weight_seed: int = option(0, "seed of the mode-weight draw", type=cli.seed)
    K: int = option(0, "unrolled discriminator steps", type=SIZE_FLAGS["K"])
    stop_grad: bool = option(False, "first term of Eq. 12 only (App. B.2)")
    average_over_steps: bool = option(False, "G's loss averaged over the K unrolled discriminators (App. B.2)")
    unroll_batches: str = option("fixed", "look-ahead steps on the current minibatch, or on fresh ones",
                                 choices=UNROLL_BATCHES)
    control: bool = option(False, "step-matched control: K+1 committed D steps per G step (the K extra at the "
                                  "--unroll-lr), no unrolling")
    g_steps: int = option(1, "generator updates per discriminator update", type=SIZE_FLAGS["g_steps"])
    steps: int = option(5000, "training iterations (one D + g-steps G updates)")
    d_lr: float = option(1e-4, "discriminator Adam learning rate (App. A)", type=cli.learning_rate)
    g_lr: float = option(1e-4, "generator Adam learning rate (App. A)", type=cli.learning_rate)
    unroll_lr: Optional[float] = option(None, "learning rate of the K look-ahead Adam steps (default: --d-lr)",
                                        type=cli.learning_rate)
    beta1: float = option(0.5, "Adam beta1 of both players (App. A)")
    beta2: float = option(0.999, "Adam beta2 of both players (App. A)")
    activation: str = option("relu", "generator activation", choices=tuple(ACTIVATIONS))
    loss: str = option("saturating", "saturating: G minimises -L_D (App. A); nonsaturating: -log D(G(z))",
                       choices=LOSSES)
    batch: int = option(512, "minibatch size (App. A)", type=SIZE_FLAGS["batch"])
    eval_every: int = option(500, "iterations between evaluations (metrics, density.png and a checkpoint)")
    eval_samples: int = option(10_000, "generator samples per evaluation", type=SIZE_FLAGS["eval_samples"])
    d_init: str = option("orthogonal", "discriminator init (App. A leaves it open): orthogonal, gain 0.8 (as G's), "
                                       "or pytorch (as torch.nn.Linear initialises)", choices=D_INITS)

    @property
    def effective_unroll_lr(self) -> float:
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
            (0 <= self.weight_std < math.inf, f"weight_std must be finite and >= 0, got {self.weight_std}"),
            (0 <= self.weight_seed < 2 ** 64, f"weight_seed must be in [0, 2**64), got {self.weight_seed}"),
            (all(0 < lr < math.inf for lr in (self.d_lr, self.g_lr, self.effective_unroll_lr)),
             "learning rates must be finite and > 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "betas must be in [0, 1)"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.unroll_batches in UNROLL_BATCHES, f"unroll_batches must be one of {UNROLL_BATCHES}"),
            (self.activation in ("relu", "tanh"), f"activation must be relu or tanh, got {self.activation!r}"),
            (self.d_init in D_INITS, f"d_init must be one of {', '.join(D_INITS)}, got {self.d_init!r}"),
            (not (self.control and (self.stop_grad or self.average_over_steps)),
             "control runs do not unroll: stop_grad / average_over_steps make no sense with control"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        make_mixture(self.dataset)  # unknown dataset -> ValueError


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


def make_surrogate(cfg: TrainConfig, transform_grads: Optional[GradMean] = None) -> Callable[..., Tensor]:
    """The generator's loss ``surrogate(d_params, d_opt_state, x, fake[, u_x, u_fake])`` (public unroll API);
    ``transform_grads`` is applied to the inner gradient of every unrolled step (the mean over ranks)."""
    return unroll.surrogate_loss(
        d_inner_loss, 0 if cfg.control else cfg.K, cfg.stop_grad,
        optimizer=unroll.adam(cfg.effective_unroll_lr, betas=_betas(cfg)),
        outer_fn=None if cfg.loss == "saturating" else _nonsaturating_outer,
        step_args=_resampled_step_args if cfg.unroll_batches == "resampled" else None,
        average_over_steps=cfg.average_over_steps, transform_grads=transform_grads)


# ----- the rules of an iteration: how G's gradient and D's update are computed, one small object per variation -----
Params = Dict[str, Tensor]
Pullback = Callable[[Tensor], Tuple[Params]]
"""G's vector-Jacobian product at its samples (``torch.func.vjp``): d loss/d samples -> (d loss/d parameters,)."""


def _unaveraged(grads: Params) -> Params:
    return grads


class StepInputs(NamedTuple):
    """One generator step's data: real points ``x`` [B, 2]; latents ``z`` [B, latent] (with resampled look-ahead
    batches, their K * B latents appended, so that G's one forward pass makes every sample); the look-ahead
    batches' real points ``u_x`` [K, B, 2], or None when the look-ahead steps reuse ``x``."""

    x: Tensor
    z: Tensor
    u_x: Optional[Tensor]


def step_inputs(batch: Batch, j: int) -> StepInputs:
    """Generator step ``j``'s inputs from the iteration's random draws (:meth:`Trainer.draw_batch`)."""
    x, z = batch["x"][j], batch["z"][j]
    if "u_x" not in batch:  # drawn only for resampled look-ahead batches of an unrolled G
        return StepInputs(x, z, None)
    return StepInputs(x, torch.cat([z, batch["u_z"][j].reshape(-1, z.shape[-1])]), batch["u_x"][j])


_d_grad_and_loss = torch.func.grad_and_value(d_inner_loss)

D_METRIC_NAMES = ("d_accuracy", "d_loss_eval")
"""The discriminator's numbers at each evaluation (:func:`discriminator_metrics`)."""


def discriminator_metrics(d_params: Dict[str, Tensor], real: Tensor, fake: Tensor) -> Dict[str, float]:
    """How well D tells ``real`` data points from generator samples ``fake`` (the evaluation's, not a training
    batch): ``d_accuracy`` = (share of real points with D(x) > 1/2 + share of fakes with D(G(z)) < 1/2) / 2 (1/2:
    chance; ties count as errors) and ``d_loss_eval`` = L_D = −mean log D(x) − mean log(1 − D(G(z))) (App. A's
    loss; 2 log 2 ≈ 1.386 at D ≡ 1/2). Draws no random numbers."""
    with torch.no_grad():
        real_logits, fake_logits = discriminator_forward(d_params, real), discriminator_forward(d_params, fake)
        accuracy = 0.5 * ((real_logits > 0).double().mean() + (fake_logits < 0).double().mean())
        return {"d_accuracy": float(accuracy), "d_loss_eval": float(d_loss_from_logits(real_logits, fake_logits))}


class GeneratorRule:
    """How G's gradient is computed. The base case is a loss of G's samples, :meth:`sample_loss`, whose gradient
    is pulled back through G's forward pass (one forward, shared with D's update, and one backward per G step);
    a rule of G's parameters overrides :meth:`samples` and :meth:`gradient` instead. A rule may carry per-seed
    state ``extra`` (a dict of tensors, vmapped and checkpointed with the rest), updated after every D update."""

    activation: str

    def init_extra(self, d: Params) -> Params:
        """The per-seed state at the start (none by default)."""
        return {}

    def after_d_step(self, extra: Params, d: Params, d_state: Dict[str, Any]) -> Params:
        """The per-seed state after a discriminator update (unchanged by default)."""
        return extra

    def samples(self, g: Params, z: Tensor) -> Tuple[Tensor, Optional[Pullback]]:
        """G's samples of ``z`` and the pullback that turns a gradient at the samples into one at G's parameters."""
        return torch.func.vjp(lambda g_: generator_forward(g_, z, self.activation), g)

    def sample_loss(self, fake: Tensor, d: Params, d_state: Dict[str, Any], extra: Params,
                    inputs: StepInputs) -> Tensor:
        """G's loss as a function of its samples ``fake`` (those of ``inputs.z``)."""
        raise NotImplementedError

    def gradient(self, g: Params, g_state: Dict[str, Any], d: Params, d_state: Dict[str, Any], extra: Params,
                 inputs: StepInputs, fake: Tensor, pullback: Optional[Pullback]) -> Tuple[Params, Tensor]:
        """(G's gradient, G's loss) at the current players."""
        assert pullback is not None
        grad_fake, loss = torch.func.grad_and_value(self.sample_loss)(fake, d, d_state, extra, inputs)
        (grads,) = pullback(grad_fake)
        return grads, loss


@dataclass(frozen=True)
class Unrolled(GeneratorRule):
    """G descends the unrolled surrogate f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)) (Eq. 10), θ_D^K after K Adam
    look-ahead steps of D from its current state; the gradient is Eq. 12's, both terms. Its options (App. B.2):
    ``stop_grad`` keeps Eq. 12's first term only, ``average_over_steps`` averages f over θ_D^1 .. θ_D^K;
    ``unroll_batches == "resampled"`` takes each look-ahead step on a fresh batch (``inputs.u_x`` and the
    samples appended to the main batch's). ``surrogate``: :func:`make_surrogate`."""

    activation: str
    surrogate: Callable[..., Tensor]

    def sample_loss(self, fake: Tensor, d: Params, d_state: Dict[str, Any], extra: Params,
                    inputs: StepInputs) -> Tensor:
        if inputs.u_x is None:
            return self.surrogate(d, d_state, inputs.x, fake)
        n_main = inputs.x.shape[0]
        return self.surrogate(d, d_state, inputs.x, fake[:n_main], inputs.u_x, fake[n_main:].reshape(inputs.u_x.shape))


class PlainGAN(Unrolled):
    """The plain GAN: :class:`Unrolled` with K = 0, G descends f(θ_G, θ_D) (Eq. 10 with K = 0): App. A's saturating
    loss -L_D, or the nonsaturating -log D(G(z)) (Goodfellow et al., 2014). Also G's rule in the step-matched
    control, whose extra D steps are committed rather than unrolled (:class:`ControlD`)."""


def generator_rule(cfg: TrainConfig, grad_mean: Optional[GradMean] = None) -> GeneratorRule:
    """G's rule for ``cfg``: :class:`PlainGAN` (K = 0, or the control), else :class:`Unrolled`; ``grad_mean``
    averages every look-ahead gradient over data-parallel ranks."""
    rule = PlainGAN if cfg.K == 0 or cfg.control else Unrolled
    return rule(cfg.activation, make_surrogate(cfg, grad_mean))


@dataclass(frozen=True)
class PlainD:
    """D's update: one Adam step at ``d_lr`` on L_D (App. A) at the iteration's first minibatch ``(x, G(z))``.
    ``average`` is applied to the gradient before the step: identity, or the mean over data-parallel ranks
    (:mod:`parallel`), which makes the step the one-process step on the global batch."""

    opt: unroll.Optimizer
    average: GradMean

    def __call__(self, d: Params, d_state: Dict[str, Any], g: Params, g_state: Dict[str, Any],
                 inputs: StepInputs, fake: Tensor, batch: Batch) -> Tuple[Params, Dict[str, Any], Tensor]:
        """(D, D's Adam state, D's loss) after the update; ``fake`` is G's samples of the main batch."""
        grads, loss = self.loss_gradient(d, g, g_state, inputs, fake)
        d, d_state = self.opt.apply(d, self.average(grads), d_state)
        return d, d_state, loss

    def loss_gradient(self, d: Params, g: Params, g_state: Dict[str, Any], inputs: StepInputs,
                      fake: Tensor) -> Tuple[Params, Tensor]:
        """(the gradient of D's loss, the loss) at ``d``."""
        return _d_grad_and_loss(d, inputs.x, fake)


@dataclass(frozen=True)
class ControlD:
    """The step-matched control of the Sec. 3.1 / Fig. 2 mixture experiment (this project's baseline, not the
    paper's: what unrolling must beat to be more than "more D steps"): the ``committed`` step of :class:`PlainD`,
    then K more committed steps (``extra``, Adam at ``effective_unroll_lr``: what unrolling spends on look-ahead steps),
    on the same minibatch or, with resampled batches, on ``c_x, G(c_z)``; G takes the plain gradient
    (:class:`PlainGAN`)."""

    committed: PlainD
    extra: PlainD
    K: int
    activation: str

    def __call__(self, d: Params, d_state: Dict[str, Any], g: Params, g_state: Dict[str, Any],
                 inputs: StepInputs, fake: Tensor, batch: Batch) -> Tuple[Params, Dict[str, Any], Tensor]:
        d, d_state, loss = self.committed(d, d_state, g, g_state, inputs, fake, batch)
        for k in range(self.K):
            if "c_x" in batch:  # drawn only for resampled batches
                inputs, fake = inputs._replace(x=batch["c_x"][k]), generator_forward(g, batch["c_z"][k],
                                                                                     self.activation)
            d, d_state, _ = self.extra(d, d_state, g, g_state, inputs, fake, batch)
        return d, d_state, loss


DiscriminatorRule = Callable[[Params, Dict[str, Any], Params, Dict[str, Any], StepInputs, Tensor, Batch],
                             Tuple[Params, Dict[str, Any], Tensor]]
"""``(d, d_state, g, g_state, inputs, fake, batch) -> (d, d_state, d_loss)``: D's update of an iteration, given
G's samples ``fake`` of the main batch (:class:`PlainD`, :class:`ControlD`)."""


def discriminator_rule(cfg: TrainConfig, grad_mean: Optional[GradMean] = None) -> DiscriminatorRule:
    """D's rule for ``cfg``: :class:`ControlD` with ``control``, else :class:`PlainD`; ``grad_mean`` averages
    every gradient over data-parallel ranks."""
    if cfg.control:
        extra = plain_d(cfg, grad_mean, cfg.effective_unroll_lr)
        return ControlD(plain_d(cfg, grad_mean), extra, cfg.K, cfg.activation)
    return plain_d(cfg, grad_mean)


def plain_d(cfg: TrainConfig, grad_mean: Optional[GradMean] = None, lr: Optional[float] = None) -> PlainD:
    """:class:`PlainD` with Adam at ``lr`` (default ``d_lr``) and ``cfg``'s betas."""
    average = grad_mean if grad_mean is not None else _unaveraged
    return PlainD(unroll.adam(cfg.d_lr if lr is None else lr, betas=_betas(cfg)), average)


@dataclass(frozen=True)
class Strategies:
    """An experiment's own rules in place of those :func:`generator_rule` and :func:`discriminator_rule` choose
    from the config (None: the config's). They see each step's fixed minibatch, so they do not combine with
    ``unroll_batches='resampled'``, and they run in one process."""

    generator: Optional[GeneratorRule] = None
    discriminator: Optional[DiscriminatorRule] = None


def make_iteration(cfg: TrainConfig, strategies: Optional[Strategies] = None, grad_mean: Optional[GradMean] = None
                   ) -> Callable[[TrainState, Batch], Tuple[TrainState, Dict[str, Tensor]]]:
    """The pure training iteration ``(state, batch) -> (state, {"d_loss", "g_loss"})`` for ONE seed.

    As in the reference implementation, both players see the same minibatch ``(x[0], G(z[0]))``: D takes one
    update on it (its rule), then G takes ``g_steps`` Adam steps (step j on ``x[j], z[j]``), each on its rule's
    gradient. G's forward pass is shared between the D update and the first G step, so G costs one forward and
    one backward per generator step. Data-parallel (:mod:`parallel`): with ``grad_mean``
    (``unroll.distributed.all_reduce_mean()``) and each rank's shard of the batch, every gradient is averaged over
    ranks before its Adam step: the one-process iteration on the global batch.
    """
    strategies = strategies or Strategies()
    if cfg.unroll_batches == "resampled" and strategies != Strategies():
        raise ValueError("an experiment's own generator / discriminator rules use the fixed minibatch: they do "
                         "not combine with unroll_batches='resampled'")
    generator = strategies.generator or generator_rule(cfg, grad_mean)
    discriminator = strategies.discriminator or discriminator_rule(cfg, grad_mean)
    average = grad_mean if grad_mean is not None else _unaveraged
    g_opt = unroll.adam(cfg.g_lr, betas=_betas(cfg))

    def iteration(state: TrainState, batch: Batch) -> Tuple[TrainState, Dict[str, Tensor]]:
        g, d, g_state, d_state, extra = state["g"], state["d"], state["g_opt"], state["d_opt"], state["extra"]
        g_loss = d_loss = None
        for j in range(cfg.g_steps):
            inputs = step_inputs(batch, j)
            fake, pullback = generator.samples(g, inputs.z)
            if j == 0:  # one D update per iteration, on G's samples of the first minibatch
                main_fake = fake[:inputs.x.shape[0]]
                d, d_state, d_loss = discriminator(d, d_state, g, g_state, inputs, main_fake, batch)
                extra = generator.after_d_step(extra, d, d_state)
            grads, g_loss = generator.gradient(g, g_state, d, d_state, extra, inputs, fake, pullback)
            g, g_state = g_opt.apply(g, average(grads), g_state)
        new_state = {"g": g, "d": d, "g_opt": g_state, "d_opt": d_state, "extra": extra}
        return new_state, {"d_loss": d_loss, "g_loss": g_loss}

    return iteration


def init_state(cfg: TrainConfig, seed: int, strategies: Optional[Strategies] = None) -> TrainState:
    """Seed ``seed``'s initial parameters and fresh Adam states; independent of K and every other flag."""
    gen = torch.Generator().manual_seed(seed * _STREAMS + _INIT)
    g, d = init_generator(gen), init_discriminator(gen, init=cfg.d_init)
    opt = unroll.adam(cfg.d_lr, betas=_betas(cfg))  # the state layout does not depend on the lr
    rule = strategies.generator if strategies is not None else None
    extra = rule.init_extra(d) if rule is not None else {}  # the per-seed state of an experiment's generator rule
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


# What each part of a TrainState is, for divergence messages.
STATE_PARTS = {"g": "generator parameters", "d": "discriminator parameters", "g_opt": "generator Adam state",
               "d_opt": "discriminator Adam state", "extra": "generator rule state"}
LOSS_NAMES = {"d_loss": "discriminator loss", "g_loss": "generator loss"}
# What a checkpoint's (and final.pt's) log holds, with the type of each part.
LOG_TYPES = {"records": list, "snapshots": list, "last_losses": (dict, type(None))}
DENSITY = "density.pt"
"""The density snapshots of every evaluation (the data of density.png), exported beside metrics.json for the
figures of the sweeps (:func:`read_snapshots`)."""
DEFAULT_CHECKPOINT_EVERY = 100


def write_records(records: List[Dict[str, Any]], meta: Dict[str, Any], out_dir: Path) -> None:
    """``metrics.json`` (meta + records; strict JSON, ``null`` for a missing value) and ``metrics.csv`` (one row
    per evaluation step and seed)."""
    runs.write_json(out_dir / "metrics.json", {**meta, "records": records})
    text = io.StringIO()
    if records:
        # Every key of every record: a run resumed from before a metric was added has records with and without it.
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
        writer.writeheader()
        writer.writerows(records)
    runs.atomic_write_bytes(out_dir / "metrics.csv", text.getvalue().encode())


def run_name(cfg: TrainConfig) -> str:
    """A folder name that tells the settings apart."""
    default = TrainConfig()
    kind = f"control{cfg.K}" if cfg.control else f"K{cfg.K}"
    parts = [cfg.dataset, kind, f"ulr{cfg.effective_unroll_lr:g}", f"glr{cfg.g_lr:g}", cfg.activation, cfg.loss[:3]]
    # Settings added after the first sweep are named only when they differ from the default, so that the
    # folders of earlier runs keep their names.
    if cfg.d_lr != default.d_lr:
        parts.append(f"dlr{cfg.d_lr:g}")
    if cfg.g_steps != default.g_steps:
        parts.append(f"g{cfg.g_steps}")
    if cfg.stop_grad:
        parts.append("stopgrad")
    if cfg.average_over_steps:
        parts.append("avg")
    if cfg.unroll_batches != "fixed":
        parts.append(cfg.unroll_batches)
    if cfg.weight_std:
        parts.append(f"wstd{cfg.weight_std:g}")
    if cfg.d_init != default.d_init:
        parts.append(f"d{cfg.d_init}")
    return "_".join(parts)


class Trainer:
    """Trains ``cfg`` for every seed in ``seeds`` at once; evaluates, checkpoints and writes outputs.

    ``out_dir=None`` keeps everything in memory (tests, benchmarks). Otherwise ``out_dir`` gets ``metrics.json``
    and ``metrics.csv`` at every evaluation, ``density.png`` at every evaluation too (but for those that come
    sooner than drawing it is worth: :class:`plotting.FigureBudget`; always at the end) and ``checkpoint.pt`` at
    every evaluation and every ``checkpoint_every`` iterations; ``resume=True`` continues from that checkpoint
    (refusing other settings) and ends with exactly the numbers of an uninterrupted run. Every iteration checks the
    losses, parameters and Adam states of every seed: the first NaN or infinity raises :class:`runs.Diverged`,
    naming it, its iteration and its seed. (The caller holds ``out_dir`` with :func:`runs.claim`.) ``strategies``: an
    experiment's own rules (:class:`Strategies`), in place of those the config chooses.
    """

    def __init__(self, cfg: TrainConfig, seeds: Sequence[int], out_dir: Optional[Path] = None,
                 strategies: Optional[Strategies] = None, resume: bool = False, progress: bool = False,
                 figure_seeds: int = 4, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                 parallel: Optional[DataParallel] = None, start: Optional[runs.Checkpoint] = None) -> None:
        cfg.validate()
        seeds = [int(s) for s in seeds]
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0 or len(seeds) > MAX_SEEDS:
            raise ValueError(f"seeds must be at most {MAX_SEEDS} distinct non-negative integers, got {seeds}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if parallel is not None and strategies is not None:
            raise ValueError("an experiment's own rules (the App. B ablations) are not data-parallel: run them in "
                             "one process")
        if parallel is not None and cfg.batch % parallel.world:
            raise ValueError(f"batch {cfg.batch} does not split evenly over {parallel.world} ranks")
        if start is not None and resume:
            raise ValueError("start from another run's final state or resume this run's checkpoint, not both")
        self.cfg, self.seeds, self.strategies, self.parallel = cfg, seeds, strategies, parallel
        # Every rank trains, evaluates and holds the same numbers; only rank 0 writes.
        self.writes = out_dir is not None and (parallel is None or parallel.writes)
        progress = progress and (parallel is None or parallel.writes)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.progress, self.figure_seeds, self.checkpoint_every = progress, figure_seeds, checkpoint_every
        self.mixture = make_mixture(cfg.dataset, cfg.weight_std, cfg.weight_seed)
        self.extent = histogram_extent(self.mixture)
        self.reference = self.mixture.sample(max(cfg.eval_samples, 2000),
                                             torch.Generator().manual_seed(_REFERENCE_SEED))
        self.step_fn = torch.func.vmap(make_iteration(cfg, strategies, None if parallel is None else parallel.mean))
        self.streams = {name: [torch.Generator().manual_seed(s * _STREAMS + j) for s in seeds]
                        for name, j in (("main", _MAIN), ("extra", _EXTRA))}
        # vmap over a batch of one takes other reduction kernels than over >= 2 (last-bit differences in the
        # bias gradients), so a lone seed is run next to a copy of itself to give the numbers it gets in a batch.
        self._copies = 2 if len(seeds) == 1 else 1
        self.state = stack_states([init_state(cfg, s, strategies) for s in seeds] * self._copies)
        self.step = 0
        self.train_seconds = 0.0
        self.records: List[Dict[str, Any]] = []
        self.snapshots: List[Tuple[int, Tensor]] = []  # (step, int32 histograms [S, bins, bins])
        self.last_losses: Optional[Dict[str, Tensor]] = None
        self.diverged: Optional[Dict[str, Any]] = None
        self.checkpoint_step: Optional[int] = None  # the iteration of the last checkpoint written or read
        self.figure_budget = FigureBudget()
        if resume:
            self._load_checkpoint()
        elif start is not None:
            self._start_from(start)

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
            else:
                batch["u_x"], batch["u_z"] = xz(extra, cfg.g_steps, cfg.K)
        return batch

    def draw_batch(self) -> Batch:
        """This iteration's random inputs, stacked over seeds (data-parallel: this rank's shard of the batch)."""
        batch = stack_states([self._draw(i) for i in range(len(self.seeds))] * self._copies)
        if self.parallel is None:
            return batch
        return {name: self.parallel.shard(value) for name, value in batch.items()}  # every value is [..., batch, d]

    # ----- evaluation -----
    def generator_samples(self, i: int, n: Optional[int] = None) -> Tensor:
        """``n`` (default ``eval_samples``) generator samples of seed index ``i``, from fixed per-seed latents."""
        n = self.cfg.eval_samples if n is None else n
        gen = torch.Generator().manual_seed(self.seeds[i] * _STREAMS + _EVAL)
        z = torch.randn(n, LATENT_DIM, generator=gen)
        with torch.no_grad():
            return generator_forward(index_state(self.state["g"], i), z, self.cfg.activation)

    def evaluate(self) -> List[Dict[str, Any]]:
        """Metrics of every seed at the current step; appended to ``records`` and snapshotted for the figure (once
        per step: a run resumed at the step of its last evaluation is not measured twice)."""
        if self.snapshots and self.snapshots[-1][0] == self.step:
            return [r for r in self.records if r["step"] == self.step]
        records, hists = [], []
        m = self.mixture
        for i, seed in enumerate(self.seeds):
            samples = self.generator_samples(i)
            metrics = all_metrics(samples, self.reference, m.centers, m.std, m.weights)
            losses = {k: (float(v[i]) if self.last_losses is not None else float("nan"))
                      for k, v in (self.last_losses or {"d_loss": None, "g_loss": None}).items()}
            d_metrics = discriminator_metrics(index_state(self.state["d"], i), self.reference[:len(samples)], samples)
            records.append({"step": self.step, "seed": seed, **metrics, **losses, **d_metrics})
            hists.append(density_histogram(samples, self.extent))
        self.records.extend(records)
        self.snapshots.append((self.step, torch.stack(hists)))
        return records

    # ----- checkpoints and outputs -----
    def settings(self) -> Dict[str, Any]:
        """What defines the run's numbers: the configuration and the seeds."""
        return {**dataclasses.asdict(self.cfg), "seeds": self.seeds}

    def _meta(self, status: str) -> Dict[str, Any]:
        return {"status": status, "config": dataclasses.asdict(self.cfg), "seeds": self.seeds,
                "step": self.step, "diverged": self.diverged, "metric_names": list(METRIC_NAMES)}

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return None if self.out_dir is None else self.out_dir / CHECKPOINT

    def _checkpoint(self) -> runs.Checkpoint:
        return runs.Checkpoint(
            self.settings(), self.step, self.train_seconds, self.state,
            {name: [g.get_state() for g in gens] for name, gens in self.streams.items()},
            {"records": self.records, "snapshots": self.snapshots, "last_losses": self.last_losses})

    def _save_checkpoint(self) -> None:
        assert self.checkpoint_path is not None
        runs.write_checkpoint(self.checkpoint_path, self._checkpoint())
        self.checkpoint_step = self.step

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        # Only the length of training may change on resume; anything else would silently mix two runs.
        ckpt = runs.read_checkpoint(path, self.settings(), ("steps",), self.cfg.steps)
        assert path is not None
        self._apply(ckpt, path)
        self.step, self.train_seconds = ckpt.step, ckpt.train_seconds
        self.records, self.snapshots = list(ckpt.log["records"]), list(ckpt.log["snapshots"])
        self.last_losses = ckpt.log["last_losses"]
        self.checkpoint_step = self.step

    def _start_from(self, final: runs.Checkpoint) -> None:
        """Continue another finished run's seeds (:func:`read_final`, its seeds chosen by :func:`select_seeds`):
        their players, Adam states and data streams, at iteration 0 of this run."""
        n = len(self.seeds)
        state = stack_states([index_state(final.state, i) for i in range(n)] * self._copies)
        self._apply(dataclasses.replace(final, state=state), Path(f"the starting state of seeds {self.seeds}"))

    def _apply(self, ckpt: runs.Checkpoint, path: Path) -> None:
        """Check ``ckpt``'s state, streams and log against this run (before anything is used), then take its
        state and streams."""
        difference = runs.layout_difference(self.state, ckpt.state)
        if difference:
            raise runs.CheckpointError(f"{path} does not fit this run ({difference})")
        self._check_contents(ckpt, path)
        with runs.reading(path):
            for name, gens in self.streams.items():
                if len(ckpt.rng[name]) != len(gens):
                    raise ValueError(f"{len(ckpt.rng[name])} {name} random streams for {len(gens)}")
                for g, rng_state in zip(gens, ckpt.rng[name]):
                    g.set_state(rng_state)
            self.state = ckpt.state

    def _check_contents(self, ckpt: runs.Checkpoint, path: Path) -> None:
        """What the layout check does not see, checked before anything is used: Adam step counts, records,
        snapshots and losses of this run's seeds, none after the checkpoint's iteration (a checkpoint with
        garbage there used to be applied, and rewritten with it, before the run failed)."""
        n, step = len(self.seeds), ckpt.step
        for name, kind in LOG_TYPES.items():
            runs.require(name in ckpt.log and runs.is_a(ckpt.log[name], kind), path,
                         f"its log's {name} is {runs.brief(ckpt.log.get(name))}, not {runs.type_name(kind)}")
        runs.require(set(ckpt.rng) == set(self.streams), path,
                     f"random streams {sorted(ckpt.rng)} where {sorted(self.streams)} are expected")
        for player in ("g_opt", "d_opt"):
            count = ckpt.state[player]["step"]
            runs.require(bool(torch.all((count >= 0) & (count == count.round()))), path,
                         f"{player} step counts {count.tolist()} are not whole numbers >= 0")
        for record in ckpt.log["records"]:
            runs.require(isinstance(record, dict) and runs.is_a(record.get("step"), int)
                         and 0 <= record["step"] <= step and record.get("seed") in self.seeds, path,
                         f"a metrics record {runs.brief(record)} is not one of this run's evaluations")
        template = density_histogram(torch.zeros(1, 2), self.extent)
        for snapshot in ckpt.log["snapshots"]:
            ok = isinstance(snapshot, (tuple, list)) and len(snapshot) == 2 and runs.is_a(snapshot[0], int) \
                and 0 <= snapshot[0] <= step and isinstance(snapshot[1], Tensor) \
                and snapshot[1].shape == (n, *template.shape) and snapshot[1].dtype == template.dtype
            runs.require(ok, path, f"a density snapshot {runs.brief(snapshot)} is not {n} int32 histograms "
                                   f"{tuple(template.shape)} of an iteration up to {step}")
        if ckpt.log["last_losses"] is not None:
            expected = {name: torch.zeros(n * self._copies) for name in LOSS_NAMES}
            difference = runs.layout_difference(expected, ckpt.log["last_losses"], "last_losses")
            runs.require(difference is None, path, difference or "")

    def write_outputs(self, status: str) -> None:
        """``metrics.json``, ``metrics.csv`` and ``density.pt``; with ``status == "done"``, ``final.pt`` too."""
        if not self.writes:
            return
        assert self.out_dir is not None
        write_records(self.records, self._meta(status), self.out_dir)
        runs.save_checkpoint({"settings": self.settings(), "snapshots": self.snapshots}, self.out_dir / DENSITY)
        if status == "done":
            runs.write_final(self.out_dir / runs.FINAL, self._checkpoint())

    def save_figure(self, path: Optional[Path] = None) -> None:
        """Rows = the first ``figure_seeds`` seeds, columns = evaluation steps, last column the data."""
        if not self.writes and path is None:
            return
        rows = [(f"seed {seed}", [(step, hist[i]) for step, hist in self.snapshots])
                for i, seed in enumerate(self.seeds[:self.figure_seeds])]
        data_hist = density_histogram(self.reference, self.extent)
        cfg = self.cfg
        kind = "control" if cfg.control else f"K={cfg.K}"
        plot_density_grid(rows, data_hist, self.extent, path or self.out_dir / "density.png",
                          title=f"{cfg.dataset}, {kind}, unroll lr {cfg.effective_unroll_lr:g}, {cfg.activation}, "
                                f"{cfg.loss}")

    # ----- the loop -----
    def _check_finite(self, losses: Dict[str, Tensor]) -> None:
        """Stop at the first NaN or infinity in this iteration's losses, parameters or Adam states: outputs stay
        at the last evaluation, the checkpoint at the last good one."""
        n = len(self.seeds)
        found = runs.first_nonfinite({LOSS_NAMES[k]: v[:n] for k, v in losses.items()}, batched=True) \
            or runs.first_nonfinite({STATE_PARTS[k]: v for k, v in self.state.items()}, batched=True)
        if found is None:
            return
        index, which, value = found
        step, seed = self.step + 1, self.seeds[index % n]
        self.diverged = {"step": step, "seed": seed, "which": which, "value": value}
        if self.writes:
            self.write_outputs("diverged")
            self.save_figure()
        raise runs.Diverged(step, seed, which, value, self.checkpoint_path, self.checkpoint_step)

    def postfix(self) -> Dict[str, str]:
        """The progress bar's summary of the latest evaluation."""
        latest = [r for r in self.records if r["step"] == self.step] or self.records[-len(self.seeds):]
        mean = lambda k: sum(r[k] for r in latest) / len(latest)  # noqa: E731
        # Strict modes and HQ first: they tell a learned ring from a diffuse cloud, which covers every mode.
        return {"step@eval": str(latest[0]["step"]),
                "strict modes": f"{mean('modes_strict'):.1f}/{self.mixture.n_modes}",
                "hq": f"{100 * mean('hq'):.1f}%", "rkl": f"{mean('reverse_kl'):.3f}", "modes": f"{mean('modes'):.1f}"}

    def iterate(self) -> None:
        """One iteration of every seed (:func:`make_iteration`, vmapped); raises :class:`runs.Diverged`."""
        self.state, losses = self.step_fn(self.state, self.draw_batch())
        if self.parallel is not None:
            losses = self.parallel.mean_values(losses)  # the global batch's losses, the same on every rank
        self._check_finite(losses)
        self.last_losses = losses

    def checkpoint(self, evaluated: bool, done: bool) -> None:
        """The checkpoint; after an evaluation the outputs too (metrics, density.pt, density.png, and at the end
        final.pt), written first: a kill between the two leaves the checkpoint behind the outputs, and the resumed
        run redoes those iterations and rewrites the same outputs (the other way round, a run could end with its
        checkpoint at the last iteration and its outputs short of it, for good). Only rank 0 writes."""
        if not self.writes:
            if self.out_dir is not None:
                self.checkpoint_step = self.step  # rank 0 wrote it: the same message on every rank
            return
        if evaluated:
            self.write_outputs("done" if done else "running")
            self.figure_budget.draw(self.save_figure, force=done)
        self._save_checkpoint()

    def run(self) -> List[Dict[str, Any]]:
        """Train to ``cfg.steps`` iterations (:func:`loop.train`); returns the metric records. Raises
        :class:`runs.Diverged`."""
        cfg = self.cfg
        loop.train(self, cfg.steps, cfg.eval_every, self.checkpoint_every, progress=self.progress,
                   desc=f"{cfg.dataset} {'control' if cfg.control else 'K'}={cfg.K}")
        return self.records


def read_snapshots(folder: Path) -> List[Tuple[int, Tensor]]:
    """The density snapshots a run exported (``density.pt``): ``(iteration, int32 histograms [seeds, bins, bins])``
    per evaluation. Raises :class:`runs.CheckpointError` naming the file when it is not such a list."""
    path = Path(folder) / DENSITY
    snapshots = runs.load_checkpoint(path, ("snapshots",), {"snapshots": list})["snapshots"]
    for snapshot in snapshots:
        ok = isinstance(snapshot, (tuple, list)) and len(snapshot) == 2 and runs.is_a(snapshot[0], int) \
            and isinstance(snapshot[1], Tensor) and snapshot[1].dim() == 3 and snapshot[1].dtype == torch.int32
        runs.require(ok, path, f"a density snapshot {runs.brief(snapshot)} is not (iteration, int32 histograms)")
    return [(int(step), hist) for step, hist in snapshots]


def select_seeds(final: runs.Checkpoint, seeds: Sequence[int]) -> runs.Checkpoint:
    """``final`` (a finished run's :func:`runs.read_final`) restricted to ``seeds``, in that order: what
    ``Trainer(..., start=)`` continues. Raises ``ValueError`` naming seeds the run does not have."""
    have = [int(s) for s in final.settings.get("seeds", [])]
    missing = sorted(set(seeds) - set(have))
    if missing:
        raise ValueError(f"seeds {missing} are not in that run (it has {have})")
    index = [have.index(s) for s in seeds]
    state = stack_states([index_state(final.state, i) for i in index])
    rng = {name: [streams[i] for i in index] for name, streams in final.rng.items()}
    return dataclasses.replace(final, settings={**final.settings, "seeds": list(seeds)}, state=state, rng=rng)
