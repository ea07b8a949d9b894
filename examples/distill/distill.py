"""Dataset distillation (Wang, Zhu, Torralba & Efros, 2018): learn a few synthetic MNIST images, and one learning
rate per training step, such that a LeNet trained on them for K steps classifies real digits.

The outer loss is the cross-entropy on a real minibatch after K unrolled SGD steps on the synthetic images
(``unroll.surrogate_loss`` with ``outer_fn``/``outer_args``); Adam descends it in the pixels and the log learning
rates. ``--init fixed`` distils for one fixed network initialisation (the paper's first setting), ``--init random``
for a fresh initialisation every outer step. Evaluation trains fresh networks on the distilled images (same K
steps, the learned rates) and on two controls (as many random real images; the per-class mean images; both with a
constant learning rate tuned on the distillation half), and measures accuracy on held-out digits.

Data: the MNIST *test* split (10,000 digits), divided once into a distillation half and a held-out half (the paper
used the 60,000-digit train split).

    python examples/distill/distill.py --ipc 1 --init fixed     # 600 outer steps: 10.5 min on one thread
    python examples/distill/distill.py --ipc 10 --init random   # the same
    python examples/distill/distill.py --ipc 10 --init random --checkpoint 10   # ~3x slower, ~1/3 the memory
    python examples/distill/distill.py --ipc 10 --init random --window 20   # RaT-BPTT: 20 of K steps differentiated
    python examples/distill/distill.py --ipc 1 --init fixed --long          # 4x the outer steps
    python examples/distill/distill.py ... --resume                         # continue a stopped run in its --out

Writes ``metrics.json``, ``table.md`` and ``distilled.png`` (the images) to ``--out`` (default
``runs/distill/ipc<N>_<init>[_window<T>]``), and ``checkpoint.pt`` while it trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import unroll
from unroll_examples import runs
from unroll_examples.cli import HelpFormatter, add_threads_flag, learning_rate, positive_int, seed
from unroll_examples.mnist_data import load_mnist
from unroll_examples.plotting import image_grid, pyplot, save_figure

Params = Dict[str, Tensor]
LossFn = Callable[..., Tensor]

# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class Config:
    ipc: int = 1                   # synthetic images per class
    init: str = "fixed"            # "fixed": one network initialisation; "random": a fresh one every outer step
    K: int = 100                   # inner SGD steps (unrolled, one learned learning rate each)
    steps: int = 600               # outer (Adam) steps
    outer_batch: int = 512         # real digits in the outer loss
    image_lr: float = 0.03         # Adam on the pixels, cosine-decayed to 0 over `steps`
    lr_lr: float = 0.01            # Adam on the log learning rates, same schedule
    init_lr: float = 0.02          # every inner step's learning rate at the start (the paper's 0.02)
    checkpoint: int = 0            # surrogate_loss(checkpoint=N): at most N stored states; 0 = plain unroll
    #   (the plain unroll of K = 100 LeNet steps holds ~90 MiB here; N = 10 cuts that to ~30 MiB for ~3x the time,
    #   docs/results/distill.md: worth it for larger K, batches or networks, not at this size on a CPU)
    window: int = 0                # RaT-BPTT: differentiate a random window of T inner steps; 0 = all K steps
    eval_seeds: int = 5            # fresh networks per row of the table
    seed: int = 0
    limit: int = 0                 # use only the first N digits of each half (quick tests); 0 = all 5,000
    checkpoint_every: int = 50     # outer steps between checkpoints
    monitor_every: int = 100       # outer steps between held-out accuracy prints (never used for a choice)


LONG = {"steps": 2400}             # --long
SPLIT_SEED = 0                     # the one division of the test split into halves, the same for every run
EVAL_SEED_BASE = 10_000            # evaluation networks and real-image draws never reuse a training seed
LR_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # the controls' constant learning rate is tuned over this grid
TUNE_SEEDS = 3
MEAN, STD = 0.1307, 0.3081         # MNIST pixel statistics: images live in normalised units, as in the paper
CLASSES = 10


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Data:
    x_distill: Tensor              # [N, 1, 28, 28] normalised, the half the distillation and tuning may see
    y_distill: Tensor
    x_held: Tensor                 # the half only the final evaluation sees
    y_held: Tensor
    description: str


def load_data(limit: int = 0, data_dir: Optional[str] = None) -> Data:
    mnist = load_mnist("test", data_dir, download=False)  # checksummed
    x = ((mnist.images.float() / 255 - MEAN) / STD).unsqueeze(1)
    perm = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = len(mnist) // 2
    first, second = perm[:half], perm[half:]
    if limit:
        first, second = first[:limit], second[:limit]
    return Data(x[first], mnist.labels[first], x[second], mnist.labels[second],
                f"{mnist.description}, divided once (seed {SPLIT_SEED}) into {len(first):,} digits to distil from "
                f"and {len(second):,} held out")


def to_pixels(x: Tensor) -> Tensor:
    """Normalised images -> [0, 1] pixels, for the figure."""
    return (x * STD + MEAN).clamp(0, 1)


# ------------------------------------------------------------------------------------------ the network


class LeNet(nn.Module):
    """LeNet-5 on 28x28 digits (44k parameters); only its structure is used, through functional_call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 120), nn.Linear(120, 84), nn.Linear(84, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


NET = LeNet()


def init_params(seed: int) -> Params:
    """PyTorch's default initialisation of a LeNet, deterministic in ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {name: p.detach() for name, p in LeNet().named_parameters()}


def cross_entropy(params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(NET, params, (x,)), y)


@torch.no_grad()
def accuracy(params: Params, x: Tensor, y: Tensor) -> float:
    """A network whose training diverged (non-finite weights) is scored at chance, 1/10 (see ``diverged``)."""
    if diverged(params):
        return 1 / CLASSES
    return float((functional_call(NET, params, (x,)).argmax(1) == y).float().mean())


def diverged(params: Params) -> bool:
    return not all(bool(torch.isfinite(p).all()) for p in params.values())


# ------------------------------------------------------------------------------------------ the unroll


def one_group_per_step(k: int, images: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """step_args: inner step k sees image group k mod ipc (one image per class), cycling like epochs. A pure
    function of k, as checkpointing may call it again in the backward pass."""
    return images[k % images.shape[0]], labels


def scaled_by(log_lrs: Tensor) -> Callable[[Dict[str, Tensor], int], Dict[str, Tensor]]:
    """transform_grads: step k's gradient times exp(log_lrs[k]); with unroll.sgd(lr=1.0) that is SGD with a learned
    rate per step, and the rates stay positive."""
    def scale(grads: Dict[str, Tensor], k: int) -> Dict[str, Tensor]:
        lr = log_lrs[k].exp()
        return {name: lr * g for name, g in grads.items()}
    return scale


def surrogate(loss: LossFn, log_lrs: Tensor, K: int, window: int = 0, checkpoint: int = 0) -> Callable[..., Tensor]:
    """``f(params, state, images, labels, outer_args=(x, y))``: ``loss`` on (x, y) after K inner SGD steps on the
    synthetic groups, differentiable in images and log_lrs through the last ``window`` steps (0: all of them)."""
    return unroll.surrogate_loss(loss, K, optimizer=unroll.sgd(lr=1.0), outer_fn=loss,
                                 step_args=one_group_per_step, transform_grads=scaled_by(log_lrs),
                                 checkpoint=checkpoint or False, truncate=window or None)


def train_on(images: Tensor, labels: Tensor, lrs: Tensor, params: Params) -> Params:
    """Plain training (nothing differentiated): len(lrs) SGD steps, step k on group k mod ipc at rate lrs[k]. The
    evaluation runs the exact procedure that was distilled for. A rate too large for the data diverges: the
    weights become non-finite and ``accuracy`` scores the network at chance, instead of stopping the run."""
    run = unroll.unrolled_params(cross_entropy, len(lrs), stop_grad=True, optimizer=unroll.sgd(lr=1.0),
                                 step_args=one_group_per_step, transform_grads=scaled_by(lrs.log()),
                                 check_finite=False)
    return run(params, unroll.sgd(lr=1.0).init(params), images.detach(), labels)[0]


# --- the variations: each outer step draws its starting network and how many leading steps are not differentiated


def step_generator(cfg: Config, step: int) -> torch.Generator:
    """All randomness of outer step ``step`` comes from here: a resumed run draws exactly what it would have."""
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) % 2**63)


def start_fixed(cfg: Config, gen: torch.Generator) -> Params:
    return init_params(cfg.seed)


def start_random(cfg: Config, gen: torch.Generator) -> Params:
    return init_params(int(torch.randint(2**62, (), generator=gen)))


STARTS: Dict[str, Callable[[Config, torch.Generator], Params]] = {"fixed": start_fixed, "random": start_random}


def committed_steps(cfg: Config, gen: torch.Generator) -> int:
    """RaT-BPTT (Feng et al., 2024): n ~ U{0..K-T} steps are run but not differentiated, then T are; 0 without a
    window (the full K-step gradient)."""
    return int(torch.randint(cfg.K - cfg.window + 1, (), generator=gen)) if cfg.window else 0


# ------------------------------------------------------------------------------------------ one outer step


@dataclass
class Distillation:
    """What training changes: the images, the log learning rates and their Adam state."""
    images: Tensor                 # [ipc, 10, 1, 28, 28]
    log_lrs: Tensor                # [K]
    opt: torch.optim.Adam

    @classmethod
    def start(cls, cfg: Config) -> Distillation:
        gen = torch.Generator().manual_seed(cfg.seed)
        images = torch.randn(cfg.ipc, CLASSES, 1, 28, 28, generator=gen).requires_grad_()
        log_lrs = torch.full((cfg.K,), math.log(cfg.init_lr)).requires_grad_()
        opt = torch.optim.Adam([{"params": [images], "lr": cfg.image_lr}, {"params": [log_lrs], "lr": cfg.lr_lr}],
                               betas=(0.5, 0.999))
        return cls(images, log_lrs, opt)


LABELS = torch.arange(CLASSES)


def outer_step(cfg: Config, dist: Distillation, data: Data, step: int) -> float:
    gen = step_generator(cfg, step)
    batch = torch.randint(len(data.y_distill), (cfg.outer_batch,), generator=gen)
    n = committed_steps(cfg, gen)
    params = STARTS[cfg.init](cfg, gen)
    f = surrogate(cross_entropy, dist.log_lrs, n + (cfg.window or cfg.K), cfg.window, cfg.checkpoint)
    loss = f(params, unroll.sgd(lr=1.0).init(params), dist.images, LABELS,
             outer_args=(data.x_distill[batch], data.y_distill[batch]))
    for group, base in zip(dist.opt.param_groups, (cfg.image_lr, cfg.lr_lr)):
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))  # cosine decay: no state to resume
    dist.opt.zero_grad()
    loss.backward()
    dist.opt.step()
    return float(loss.detach())


# ------------------------------------------------------------------------------------------ evaluation


def random_real(data: Data, ipc: int, gen: torch.Generator) -> Tensor:
    """[ipc, 10, 1, 28, 28]: ``ipc`` random real digits of each class from the distillation half."""
    per_class = []
    for c in range(CLASSES):
        pool = (data.y_distill == c).nonzero().squeeze(1)
        per_class.append(data.x_distill[pool[torch.randperm(len(pool), generator=gen)[:ipc]]])
    return torch.stack(per_class, 1)


def class_means(data: Data) -> Tensor:
    """[1, 10, 1, 28, 28]: the mean distillation-half digit of each class (every step sees the ten means)."""
    return torch.stack([data.x_distill[data.y_distill == c].mean(0) for c in range(CLASSES)]).unsqueeze(0)


ImageSource = Callable[[torch.Generator], Tensor]


def tune_constant_lr(cfg: Config, data: Data, source: ImageSource) -> float:
    """The control's learning rate: best mean accuracy on the distillation half over LR_GRID, from random
    initialisations (held-out digits are never looked at)."""
    def score(lr: float) -> float:
        accs = []
        for s in range(TUNE_SEEDS):
            gen = torch.Generator().manual_seed(EVAL_SEED_BASE - 1 - s)
            trained = train_on(source(gen), LABELS, torch.full((cfg.K,), lr), init_params(EVAL_SEED_BASE - 1 - s))
            accs.append(accuracy(trained, data.x_distill, data.y_distill))
        return sum(accs) / len(accs)
    return max(LR_GRID, key=score)


def mean_se(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return mean, se


def evaluate(cfg: Config, dist: Distillation, data: Data) -> List[Dict[str, Any]]:
    """One row per training set: held-out accuracy after K steps from ``eval_seeds`` fresh random initialisations
    (and, for --init fixed, from the fixed initialisation the images were distilled for)."""
    learned = dist.log_lrs.detach().exp()
    sources: List[Tuple[str, ImageSource]] = [
        ("distilled", lambda gen: dist.images.detach()),
        ("random real", lambda gen: random_real(data, cfg.ipc, gen)),
        ("class means", lambda gen: class_means(data)),
    ]
    rows = []
    for name, source in sources:
        lr = None if name == "distilled" else tune_constant_lr(cfg, data, source)
        lrs = learned if lr is None else torch.full((cfg.K,), lr)

        row: Dict[str, Any] = {"data": name, "lr": "learned per step" if lr is None else lr, "diverged": 0}

        def held_out(seed_init: int, gen_seed: int) -> float:  # called in this iteration only: B023 does not apply
            images = source(torch.Generator().manual_seed(gen_seed))  # noqa: B023
            trained = train_on(images, LABELS, lrs, init_params(seed_init))  # noqa: B023
            row["diverged"] += diverged(trained)  # noqa: B023
            return accuracy(trained, data.x_held, data.y_held)

        row["random_init"] = [held_out(EVAL_SEED_BASE + s, EVAL_SEED_BASE + s) for s in range(cfg.eval_seeds)]
        if cfg.init == "fixed":  # the real-image draw still varies with the evaluation seed
            row["fixed_init"] = [held_out(cfg.seed, EVAL_SEED_BASE + s)
                                 for s in range(1 if name != "random real" else cfg.eval_seeds)]
        rows.append(row)
    return rows


def markdown_table(cfg: Config, rows: Sequence[Dict[str, Any]]) -> str:
    def cell(values: Sequence[float]) -> str:
        mean, se = mean_se(values)
        return f"{100 * mean:.1f}" if len(values) == 1 else f"{100 * mean:.1f} ± {100 * se:.1f} (n={len(values)})"

    columns = (["fixed_init"] if cfg.init == "fixed" else []) + ["random_init"]
    titles = {"fixed_init": f"from the fixed init (seed {cfg.seed})",
              "random_init": f"from {cfg.eval_seeds} fresh random inits"}
    lines = [f"| training set ({cfg.ipc * CLASSES} images, K = {cfg.K} steps) | learning rate | "
             + " | ".join(f"held-out accuracy % {titles[c]}" for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        lr = row["lr"] if isinstance(row["lr"], str) else f"constant {row['lr']:g} (tuned)"
        lines.append(f"| {row['data']} | {lr} | " + " | ".join(cell(row[c]) for c in columns) + " |")
    diverged_rows = [f"{row['data']} ({row['diverged']})" for row in rows if row["diverged"]]
    if diverged_rows:
        lines.append(f"\nnetworks whose training diverged, scored at chance (10%): {', '.join(diverged_rows)}")
    return "\n".join(lines)


def plot_images(dist: Distillation, path: Path, title: str) -> None:
    plt = pyplot()
    images = to_pixels(dist.images.detach()).flatten(0, 1) * 2 - 1  # image_grid takes [-1, 1]
    fig, ax = plt.subplots(figsize=(CLASSES * 0.9, dist.images.shape[0] * 0.9 + 0.6))
    ax.imshow(image_grid(images, ncol=CLASSES))
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------ command line


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ipc", type=positive_int, default=d.ipc, help="synthetic images per class")
    p.add_argument("--init", choices=tuple(STARTS), default=d.init,
                   help="fixed: distil for one network initialisation; random: a fresh one every outer step")
    p.add_argument("--K", type=positive_int, default=d.K, help="inner SGD steps, one learned learning rate each")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"outer Adam steps (default: {d.steps}, {LONG['steps']} with --long); may grow on --resume "
                        f"(the cosine schedule then follows the new total)")
    p.add_argument("--long", action="store_true", help=f"the longer setting: {LONG['steps']} outer steps")
    p.add_argument("--outer-batch", type=positive_int, default=d.outer_batch, help="real digits in the outer loss")
    p.add_argument("--image-lr", type=learning_rate, default=d.image_lr, help="Adam's rate on the pixels")
    p.add_argument("--lr-lr", type=learning_rate, default=d.lr_lr, help="Adam's rate on the log learning rates")
    p.add_argument("--init-lr", type=learning_rate, default=d.init_lr, help="initial inner learning rate")
    p.add_argument("--checkpoint", type=nonnegative_int, default=d.checkpoint,
                   help="surrogate_loss(checkpoint=N): keep at most N stored inner states; 0: plain unroll")
    p.add_argument("--window", type=nonnegative_int, default=d.window,
                   help="RaT-BPTT: differentiate a random window of T inner steps (0 < T <= K); 0: all K")
    p.add_argument("--eval-seeds", type=positive_int, default=d.eval_seeds, help="fresh networks per table row")
    p.add_argument("--seed", type=seed, default=d.seed, help="images, fixed init, minibatches")
    p.add_argument("--limit", type=nonnegative_int, default=d.limit,
                   help="use only the first N digits of each half (quick tests); 0: all")
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every,
                   help="outer steps between saved checkpoints")
    p.add_argument("--monitor-every", type=positive_int, default=d.monitor_every,
                   help="outer steps between held-out accuracy prints (monitoring only)")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST test files (default: as "
                        "unroll_examples.mnist_data)")
    p.add_argument("--out", default=None, help="output folder (default: runs/distill/ipc<N>_<init>[_window<T>])")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    add_threads_flag(p)
    return p


def parse_args(argv: Optional[Sequence[str]]) -> Tuple[Config, argparse.Namespace]:
    p = build_parser()
    args = p.parse_args(argv)
    if args.window > args.K:
        p.error(f"--window must be <= --K ({args.K}), got {args.window}")
    if args.steps is None:
        args.steps = LONG["steps"] if args.long else Config.steps
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in vars(args).items() if k in fields})
    if args.out is None:
        args.out = f"runs/distill/ipc{cfg.ipc}_{cfg.init}" + (f"_window{cfg.window}" if cfg.window else "")
    return cfg, args


CHECKPOINT_KEYS = ("step", "images", "log_lrs", "adam", "losses", "train_seconds")


@runs.reports_errors
def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # Everything but the number of outer steps must match on --resume (more steps extend the run); the checkpoint
    # budget and thread count change time and memory, not the numbers.
    settings = dataclasses.asdict(cfg)
    with runs.claim(out, resume=args.resume, settings=settings,
                    may_change=("steps", "checkpoint", "checkpoint_every", "monitor_every")):
        data = load_data(cfg.limit, args.data_dir)
        dist = Distillation.start(cfg)
        start, losses, train_seconds = 0, [], 0.0
        if args.resume:
            ckpt = runs.load_checkpoint(out / runs.CHECKPOINT, CHECKPOINT_KEYS)
            with runs.reading(out / runs.CHECKPOINT):
                dist.images.data.copy_(ckpt["images"])
                dist.log_lrs.data.copy_(ckpt["log_lrs"])
                dist.opt.load_state_dict(ckpt["adam"])
                start, losses, train_seconds = int(ckpt["step"]), list(ckpt["losses"]), float(ckpt["train_seconds"])
            print(f"resuming at outer step {start}")
        print(f"{data.description}; {cfg}")

        def save(step: int) -> None:
            runs.save_checkpoint({"step": step, "images": dist.images.detach(), "log_lrs": dist.log_lrs.detach(),
                                  "adam": dist.opt.state_dict(), "losses": losses,
                                  "train_seconds": train_seconds}, out / runs.CHECKPOINT)

        # ---- the training loop
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            losses.append(outer_step(cfg, dist, data, step))
            train_seconds += time.perf_counter() - t0
            if not math.isfinite(losses[-1]):
                raise runs.Diverged(step + 1, cfg.seed, "outer loss", losses[-1], out / runs.CHECKPOINT)
            if (step + 1) % cfg.monitor_every == 0 or step + 1 == cfg.steps:
                # The fixed init, or one random init no training step or table row uses.
                params = init_params(cfg.seed if cfg.init == "fixed" else EVAL_SEED_BASE - 100)
                acc = accuracy(train_on(dist.images, LABELS, dist.log_lrs.detach().exp(), params),
                               data.x_held, data.y_held)
                print(f"step {step + 1}/{cfg.steps}  outer loss {losses[-1]:.3f}  held-out acc {100 * acc:.1f}%  "
                      f"{train_seconds / (step + 1 - start or 1):.2f} s/step", flush=True)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save(step + 1)

        # ---- evaluation and outputs
        t0 = time.perf_counter()
        rows = evaluate(cfg, dist, data)
        table = markdown_table(cfg, rows)
        plot_images(dist, out / "distilled.png",
                    f"{cfg.ipc} image(s) per class, {cfg.init} init, K = {cfg.K}, {cfg.steps} outer steps"
                    + (f", window {cfg.window}" if cfg.window else ""))
        (out / "table.md").write_text(table + "\n")
        timed_steps = cfg.steps - start
        runs.write_json(out / "metrics.json", {
            "config": settings, "data": data.description, "rows": rows, "table": table,
            "learned_lrs": dist.log_lrs.detach().exp().tolist(),
            "outer_loss_first_last_50": [sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])],
            "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - t0,
            "seconds_per_outer_step": train_seconds / cfg.steps,
            "resumed_at": start if args.resume else None, "steps_this_session": timed_steps,
            "command": "python " + " ".join([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)),
        })
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
