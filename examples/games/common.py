"""Shared pieces of the zero-sum game examples: the update rules, the run loop, the table and the figure.

A game is a payoff ``f(x, y)`` that x minimises and y maximises, with its equilibrium at the origin. Every
update rule here is a *direction*: a function of the point ``z = {"x": x, "y": y}`` returning what
``unroll.sgd(lr)`` descends, so that all rules share one loop, ``z <- z - lr * direction(z)``:

- gradient descent-ascent, simultaneous and alternating;
- the look-ahead of Metz et al. (2017): x descends f(x, y^K(x, y)), y^K = K gradient-ascent steps of y
  (``unroll.surrogate_loss``), with or without ``stop_grad``; its one-step extrapolation
  (``unroll.extrapolated_surrogate_loss``); symmetric unrolling (y also looks ahead at x, ``surrogate_loss`` with
  the roles swapped); recursive unrolling (x looks ahead at K joint steps of both players, ``unroll.unrolled_game``);
- the methods a game-theory user would pick instead: extragradient (Korpelevich 1976), optimistic gradient
  descent (Daskalakis et al. 2018), consensus optimisation (Mescheder et al. 2017), symplectic gradient
  adjustment (Balduzzi et al. 2018).

Cost is counted in *gradient evaluations*: one gradient of one player's loss with respect to its own parameters
counts 1, and one backward pass through such a gradient (a Hessian-vector product: the second term of Eq. 12,
consensus, SGA) counts 1 more. The count is written next to each rule; the measured time per iteration is
reported too.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import unroll
from unroll_examples import report  # the results-page kit every example shares

Payoff = Callable[[Tensor, Tensor], Tensor]
"""``f(x, y) -> scalar``: x minimises it, y maximises it."""
Point = Dict[str, Tensor]
"""``{"x": x, "y": y}``."""
Direction = Callable[[Point], Point]
"""``direction(z) -> d``: the update is ``z - lr * d`` (``unroll.sgd(lr)``)."""

# ---- gradients (plain autograd: about 3x faster than torch.func on games this small) ----

def leaves(z: Point) -> Point:
    """Fresh leaves that require grad, so each direction differentiates at z and nothing before it."""
    return {name: v.detach().requires_grad_() for name, v in z.items()}


def field(f: Payoff, z: Point, create_graph: bool = False) -> Point:
    """ξ(z) = (∇x f, −∇y f), what simultaneous gradient descent-ascent descends (z's tensors require grad)."""
    gx, gy = torch.autograd.grad(f(z["x"], z["y"]), (z["x"], z["y"]), create_graph=create_graph)
    return {"x": gx, "y": -gy}


def with_x_loss(f: Payoff, x_loss: Callable[[Tensor, Tensor], Tensor]) -> Direction:
    """x descends its own (look-ahead) loss ``x_loss(x, y)``; y takes a plain gradient-ascent step on f."""
    def direction(z: Point) -> Point:
        (gx,) = torch.autograd.grad(x_loss(z["x"], z["y"].detach()), z["x"])
        (gy,) = torch.autograd.grad(f(z["x"].detach(), z["y"]), z["y"])
        return {"x": gx, "y": -gy}
    return direction


def y_loss(f: Payoff) -> Callable[..., Tensor]:
    """y's loss in the library's form ``inner_fn(params, *args)``: y minimises -f, and x comes in ``args``."""
    return lambda y, x: -f(x, y["y"])


def x_loss(f: Payoff) -> Callable[..., Tensor]:
    """x's loss in the library's form: x minimises f, and y comes in ``args``."""
    return lambda x, y: f(x["x"], y)


def fresh_state(lr: float, name: str, value: Tensor) -> unroll.State:
    """The optimizer state a look-ahead starts from: plain SGD has only a step counter."""
    return unroll.sgd(lr).init({name: value})


# ---- the update rules (each returns a direction; the count is its cost per iteration) ----

def simultaneous(f: Payoff, lr: float) -> Direction:
    """Simultaneous gradient descent-ascent (2 evaluations)."""
    return lambda z: field(f, z)


def alternating(f: Payoff, lr: float) -> Direction:
    """Alternating GDA, y first and x answering y's new position, as a GAN loop does D then G (2 evaluations)."""
    def direction(z: Point) -> Point:
        (gy,) = torch.autograd.grad(f(z["x"].detach(), z["y"]), z["y"])
        (gx,) = torch.autograd.grad(f(z["x"], z["y"].detach() + lr * gy), z["x"])
        return {"x": gx, "y": -gy}
    return direction


def unrolled(f: Payoff, lr: float, K: int, stop_grad: bool = False) -> Direction:
    """x descends f(x, y^K(x, y)), y^K = K ascent steps of y (Eq. 9-12): 2K + 2 evaluations, K + 2 with stop_grad."""
    look_ahead = unroll.surrogate_loss(y_loss(f), K, stop_grad, optimizer=unroll.sgd(lr))  # -(-f) at y^K
    return with_x_loss(f, lambda x, y: look_ahead({"y": y}, fresh_state(lr, "y", y), x))


def extrapolated(f: Payoff, lr: float, alpha: float) -> Direction:
    """x descends along g_0 + α(g_1 − g_0), the Discussion's cheap approximation (5 evaluations)."""
    look_ahead = unroll.extrapolated_surrogate_loss(y_loss(f), alpha, optimizer=unroll.sgd(lr))
    return with_x_loss(f, lambda x, y: look_ahead({"y": y}, fresh_state(lr, "y", y), x))


def symmetric(f: Payoff, lr: float, K: int) -> Direction:
    """Both look ahead: x at y's K steps, y at x's K steps (surrogate_loss, roles swapped): 4K + 2 evaluations."""
    x_looks_ahead = unroll.surrogate_loss(y_loss(f), K, optimizer=unroll.sgd(lr))  # f(x, y^K(x, y))
    y_looks_ahead = unroll.surrogate_loss(x_loss(f), K, optimizer=unroll.sgd(lr))  # -f(x^K(x, y), y)

    def direction(z: Point) -> Point:
        x, y = z["x"], z["y"]
        (gx,) = torch.autograd.grad(x_looks_ahead({"y": y.detach()}, fresh_state(lr, "y", y), x), x)
        (gy,) = torch.autograd.grad(y_looks_ahead({"x": x.detach()}, fresh_state(lr, "x", x), y), y)
        return {"x": gx, "y": gy}
    return direction


def recursive(f: Payoff, lr: float, K: int) -> Direction:
    """x descends f(x, y^K) where y^K ends K *joint* GDA steps of both players (unrolled_game): 4K + 2 evaluations."""
    losses = {"x": lambda p: f(p["x"]["x"], p["y"]["y"]), "y": lambda p: -f(p["x"]["x"], p["y"]["y"])}
    joint = unroll.unrolled_game(losses, K, optimizers={"x": unroll.sgd(lr), "y": unroll.sgd(lr)})

    def x_looks_ahead(x: Tensor, y: Tensor) -> Tensor:
        end, _ = joint({"x": {"x": x}, "y": {"y": y}}, {"x": fresh_state(lr, "x", x), "y": fresh_state(lr, "y", y)})
        return f(x, end["y"]["y"])
    return with_x_loss(f, x_looks_ahead)


def extragradient(f: Payoff, lr: float) -> Direction:
    """Extragradient (Korpelevich 1976): the gradient at the point one GDA step ahead (4 evaluations)."""
    def direction(z: Point) -> Point:
        return field(f, leaves({name: z[name] - lr * d for name, d in field(f, z).items()}))
    return direction


def optimistic(f: Payoff, lr: float) -> Direction:
    """Optimistic GD (Daskalakis et al. 2018): 2ξ_t − ξ_{t−1}, reusing the last gradient (2 evaluations)."""
    last: Dict[str, Point] = {}

    def direction(z: Point) -> Point:
        now = field(f, z)
        before = last.get("xi", now)
        last["xi"] = now
        return {name: 2 * now[name] - before[name] for name in now}
    return direction


def consensus(f: Payoff, lr: float, gamma: float = 1.0) -> Direction:
    """Consensus optimisation (Mescheder et al. 2017): ξ + γ ∇½|ξ|² = ξ + γ Jᵀξ (4 evaluations)."""
    def direction(z: Point) -> Point:
        xi = field(f, z, create_graph=True)
        jt_xi = torch.autograd.grad(0.5 * sum((d ** 2).sum() for d in xi.values()), list(z.values()))
        return {name: d.detach() + gamma * c for (name, d), c in zip(xi.items(), jt_xi)}
    return direction


def sga(f: Payoff, lr: float, lam: float = 1.0) -> Direction:
    """Symplectic gradient adjustment (Balduzzi et al. 2018): ξ + λAᵀξ, A = (J − Jᵀ)/2 (6 evaluations).

    λ is fixed (no sign alignment): in a zero-sum game near its equilibrium the alignment picks λ > 0 anyway.
    Jξ comes from the double-vjp trick: Jᵀu is linear in u, and its vjp with ξ is Jξ.
    """
    def direction(z: Point) -> Point:
        xi = field(f, z, create_graph=True)
        v = [d.detach() for d in xi.values()]
        u = [torch.zeros_like(d, requires_grad=True) for d in v]
        jt_u = torch.autograd.grad(list(xi.values()), list(z.values()), grad_outputs=u, create_graph=True)
        jt_v = torch.autograd.grad(list(xi.values()), list(z.values()), grad_outputs=v, retain_graph=True)
        j_v = torch.autograd.grad(jt_u, u, grad_outputs=v)
        return {name: v[i] + lam * 0.5 * (jt_v[i] - j_v[i]) for i, name in enumerate(xi)}
    return direction


@dataclass(frozen=True)
class Method:
    """An update rule with its settings, and its cost in gradient evaluations per iteration."""

    name: str
    make: Callable[[Payoff, float], Direction]
    evaluations: int
    family: str


def methods(ks: Sequence[int] = (1, 5, 10), alphas: Sequence[float] = (1.0, 2.0, 5.0, 10.0),
            gamma: float = 1.0, lam: float = 1.0) -> List[Method]:
    """Every rule of this page, with the counts of the module docstring."""
    rules = [Method("simultaneous GDA", simultaneous, 2, "baseline"),
             Method("alternating GDA", alternating, 2, "baseline")]
    for K in ks:
        rules.append(Method(f"unrolled K={K}", lambda f, lr, K=K: unrolled(f, lr, K), 2 * K + 2, "unrolled"))
    for K in ks:
        rules.append(Method(f"unrolled K={K}, stop_grad", lambda f, lr, K=K: unrolled(f, lr, K, True), K + 2,
                            "stop_grad"))
    for alpha in alphas:
        rules.append(Method(f"extrapolated α={alpha:g}", lambda f, lr, a=alpha: extrapolated(f, lr, a), 5,
                            "extrapolated"))
    for K in ks:
        rules.append(Method(f"symmetric K={K}", lambda f, lr, K=K: symmetric(f, lr, K), 4 * K + 2, "symmetric"))
    for K in ks:
        rules.append(Method(f"recursive K={K}", lambda f, lr, K=K: recursive(f, lr, K), 4 * K + 2, "recursive"))
    rules += [Method("extragradient", extragradient, 4, "other"),
              Method("optimistic GD", optimistic, 2, "other"),
              Method(f"consensus γ={gamma:g}", lambda f, lr: consensus(f, lr, gamma), 4, "other"),
              Method(f"SGA λ={lam:g}", lambda f, lr: sga(f, lr, lam), 6, "other")]
    return rules


# ---- the run loop ----

@dataclass
class Run:
    """Distance to the equilibrium after each iteration (index 0: the start)."""

    distances: List[float]
    tol: float

    @property
    def iterations_to_tol(self) -> Optional[int]:
        return next((t for t, d in enumerate(self.distances) if d <= self.tol), None)

    @property
    def diverged(self) -> bool:
        last = self.distances[-1]
        return not math.isfinite(last) or last > 1e3 * self.distances[0]


def distance(z: Point) -> float:
    return math.sqrt(sum(float((v ** 2).sum()) for v in z.values()))


def run(method: Method, f: Payoff, z0: Point, lr: float, iterations: int, tol: float = 1e-3) -> Run:
    """Iterate ``z <- sgd_step(z, direction(z))`` until the distance is <= tol, diverges, or ``iterations``."""
    direction = method.make(f, lr)
    optimizer = unroll.sgd(lr)
    z, state = dict(z0), optimizer.init(z0)
    distances = [distance(z)]
    for _ in range(iterations):
        z, state = optimizer.step(z, direction(leaves(z)), state)
        distances.append(distance(z))
        if distances[-1] <= tol or not math.isfinite(distances[-1]) or distances[-1] > 1e3 * distances[0]:
            break
    return Run(distances, tol)


def microseconds_per_iteration(rule: Method, f: Payoff, z0: Point, lr: float, calls: int = 10,
                               repeats: int = 20) -> float:
    """CPU time of one iteration (direction and step) at z0, in µs: the fastest of ``repeats`` means over ``calls``
    calls. Process CPU time, not wall time: other jobs on a shared machine would inflate the wall time."""
    direction, optimizer = rule.make(f, lr), unroll.sgd(lr)
    state = optimizer.init(z0)
    optimizer.step(z0, direction(leaves(z0)), state)  # one-off costs (allocations, autograd warm-up)
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            optimizer.step(z0, direction(leaves(z0)), state)
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def sweep(rules: Sequence[Method], f: Payoff, z0: Point, lrs: Sequence[float], iterations: int,
          tol: float = 1e-3, log: Callable[[str], None] = print) -> Dict[str, Dict[float, Run]]:
    """Every rule at every learning rate, one after the other on one thread."""
    results: Dict[str, Dict[float, Run]] = {}
    for rule in rules:
        results[rule.name] = {}
        for lr in lrs:
            results[rule.name][lr] = r = run(rule, f, z0, lr, iterations, tol)
            log(f"{rule.name:28s} lr={lr:<6g} -> {cell(r, rule, iterations)}")
    return results


def spectral_radius(rule: Method, f: Payoff, z_star: Point, lr: float, eps: float = 1e-5) -> float:
    """ρ of the update's Jacobian at the equilibrium, by central differences: < 1 converges near it, > 1 leaves it.

    Exact for a bilinear game (the update is linear). Optimistic GD's update also depends on the last gradient,
    which this map does not see: its ρ is that of its first step only, so it is not reported.
    """
    names = list(z_star)
    flat = torch.cat([z_star[n].flatten() for n in names])
    sizes = [z_star[n].numel() for n in names]

    def update(v: Tensor) -> Tensor:
        z = {n: part.view_as(z_star[n]) for n, part in zip(names, v.split(sizes))}
        d = rule.make(f, lr)(leaves(z))
        return torch.cat([(z[n] - lr * d[n]).flatten() for n in names])

    basis = torch.eye(len(flat), dtype=flat.dtype)
    jacobian = torch.stack([(update(flat + eps * e) - update(flat - eps * e)) / (2 * eps) for e in basis], 1)
    return float(torch.linalg.eigvals(jacobian).abs().max())


# ---- the report ----

def cell(r: Run, rule: Method, iterations: int) -> str:
    """``iterations (evaluations)`` to reach tol, or what happened instead."""
    t = r.iterations_to_tol
    if t is not None:
        return f"{t} ({t * rule.evaluations})"
    if r.diverged:
        return f"diverges (×1000 by {len(r.distances) - 1})"
    return f"— ({r.distances[-1]:.2g})"


def table(rules: Sequence[Method], results: Dict[str, Dict[float, Run]], lrs: Sequence[float],
          iterations: int, micros: Dict[str, float]) -> str:
    """Rows: rules; columns: evaluations per iteration, learning rates, measured µs per iteration."""
    header = (["method", "evals / iter"] + [f"lr = {lr:g}" for lr in lrs] + ["CPU µs / iter"])
    return report.table([[rule.name, str(rule.evaluations)]
                         + [cell(results[rule.name][lr], rule, iterations) for lr in lrs]
                         + [f"{micros[rule.name]:.0f}"] for rule in rules], header)


def radius_table(radii: Dict[str, Dict[float, float]], lrs: Sequence[float]) -> str:
    return report.table([[name] + [f"{row[lr]:.4f}" for lr in lrs] for name, row in radii.items()],
                        ["method"] + [f"lr = {lr:g}" for lr in lrs])


PANELS = ((("unrolled", "stop_grad"), "look-ahead (Metz et al.): full (solid), stop_grad (dashed)"),
          (("extrapolated",), "extrapolated one-step look-ahead g_0 + α(g_1 − g_0)"),
          (("symmetric", "recursive"), "symmetric (solid) and recursive (dashed) unrolling"),
          (("other",), "what a game-theory user would pick instead"))


def figure(rules: Sequence[Method], results: Dict[str, Dict[float, Run]], lr: float, path: Path,
           title: str, tol: float = 1e-3) -> None:
    """Distance to the equilibrium over iterations at one learning rate: one panel per family of rules, with
    simultaneous and alternating GDA in grey in every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(rule: Method) -> List[float]:
        return [min(v, 1e3) if math.isfinite(v) else 1e3 for v in results[rule.name][lr].distances]

    reached = [results[rule.name][lr].iterations_to_tol for rule in rules]
    right = 1.15 * max([t for t in reached if t is not None] or [len(curve(rules[0]))])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey=True)
    for ax, (families, caption) in zip(axes.flat, PANELS):
        for rule in rules:
            if rule.family == "baseline":
                ax.plot(curve(rule), color="0.6", lw=1, ls="-" if "simultaneous" in rule.name else ":",
                        label=rule.name)
        for style, family in zip(("-", "--"), families):
            members = [rule for rule in rules if rule.family == family]
            for i, rule in enumerate(members):
                ax.plot(curve(rule), style, color=f"C{i}", lw=1.5, label=rule.name)
        ax.axhline(tol, color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlim(0, right)
        ax.set_title(caption, fontsize=10)
        ax.legend(fontsize=7, ncol=2, loc="upper right")
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    for ax in axes[:, 0]:
        ax.set_ylabel("distance to the equilibrium")
    fig.suptitle(f"{title} (lr = {lr:g})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_page(doc: Path, title: str, command: str, settings: str, sections: Sequence[str], notes: str,
               main_figure: Optional[Tuple[Path, str]] = None) -> None:
    """Title, the opening (:func:`report.opening`: the kept verdict and ``main_figure``, its path and alt text),
    the command that made the page, the settings, the hand-written notes (``notes`` on a new page), then the
    generated sections."""
    report.write_page(doc, [f"# {title}", "", *report.opening(doc, main_figure), *report.made_by(command), "",
                            settings, "",
                            report.notes_block(doc, "\n" + notes + "\n"), "", *sections, ""])


def parse_args(description: str, doc: Path, iterations: int) -> argparse.Namespace:
    """The flags every game page shares; also sets one thread and float64."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=iterations, help="per run, at most")
    parser.add_argument("--doc", type=Path, default=doc, help="the page to write (the figure goes beside it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    return args


def loop_settings(iterations: int) -> str:
    """The sentence every game page's settings end with."""
    return (f"Every rule updates z ← z − lr·direction(z) with `unroll.sgd(lr)`, and every look-ahead takes its inner "
            f"steps with `unroll.sgd(lr)` at the same lr. float64, at most {iterations} iterations. Cost in gradient "
            f"evaluations as counted in `examples/games/common.py` (one player's gradient = 1, one backward pass "
            f"through such a gradient = 1 more).")


def compare(title: str, f: Payoff, z0: Point, lrs: Sequence[float], iterations: int, figure_lr: float,
            doc: Path, command: str, settings: str, notes: str, rules: Optional[Sequence[Method]] = None,
            tol: float = 1e-3) -> Dict[str, Dict[float, Run]]:
    """Run every rule at every learning rate; write the page ``doc`` with its table and figure."""
    rules = methods() if rules is None else rules
    started = time.process_time()
    results = sweep(rules, f, z0, lrs, iterations, tol)
    minutes = (time.process_time() - started) / 60
    z_star = {name: torch.zeros_like(v) for name, v in z0.items()}
    radii = {rule.name: {lr: spectral_radius(rule, f, z_star, lr) for lr in lrs} for rule in rules
             if rule.name != "optimistic GD"}
    micros = {rule.name: microseconds_per_iteration(rule, f, z0, figure_lr) for rule in rules}
    image = doc.with_suffix(".png")
    figure(rules, results, figure_lr, image, title, tol)
    legend = (f"Each cell: iterations to reach distance {tol:g} from the equilibrium (gradient evaluations in "
              f"brackets); '—' did not get there in {iterations} iterations (distance at the end in brackets); "
              f"'diverges': the distance grew 1000-fold (iteration in brackets). CPU µs / iter: process CPU time "
              f"of one iteration at the start point, lr {figure_lr:g}, fastest of 20 means over 10 calls, one "
              f"thread (compare rows, not machines).")
    write_page(doc, title, command, settings, notes=notes,
               main_figure=(image, f"distance to the equilibrium at lr = {figure_lr:g}"), sections=[
        "## Iterations to the equilibrium", "", legend, "", table(rules, results, lrs, iterations, micros), "",
        "## Spectral radius of the update at the equilibrium", "",
        "ρ of the Jacobian of z ↦ z − lr·direction(z) at the equilibrium (central differences, float64): below 1 "
        "the rule converges near the equilibrium, at rate ρ per iteration; 1 cycles; above 1 it leaves. "
        "(Optimistic GD is left out: its update also depends on the previous gradient.)", "",
        radius_table(radii, lrs), "",
        f"The sweep took {minutes:.1f} min of CPU time on one thread."])
    return results
