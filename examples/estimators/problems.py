"""The three bilevel problems of the estimator comparison, each a :class:`Problem`: an inner loss trained for K steps
from fixed parameters, an outer loss at the result, and the outer parameters phi whose gradient is estimated.

* :func:`hyperparameter`: a learned log weight decay and log learning rate of ridge regression trained by K = 300
  full-batch gradient-descent steps; outer loss = validation loss (Maclaurin, Duvenaud & Adams, ICML 2015;
  the project's ``examples/meta_learning.py`` learns the same weight decay through 10 steps).
* :func:`distillation`: ten synthetic 7x7 images (490 outer parameters) that train a fixed small MLP in K = 30 SGD
  steps; outer loss = cross-entropy on real MNIST digits (Wang, Zhu, Torralba & Efros, 2018, at a small size).
* :func:`gan`: the generator of a tiny GAN on a 2-D mixture, differentiated through K = 40 discriminator steps
  (Metz, Poole, Pfau & Sohl-Dickstein, ICLR 2017, Eq. 9-12); zero-sum, so the outer loss is minus the inner one.
  On a fixed batch the discriminator can keep separating the two samples: it has no stationary point.

Every problem is written in the form every estimator accepts: ``inner(theta, phi)`` and ``outer(theta, phi)``
with phi an explicit argument, and a fixed inner optimizer (``unroll.sgd(lr=1)``) for all of them. A learned
learning rate η therefore enters as a factor on the inner loss: plain SGD on η·L with rate 1 is θ − η∇L, the same
update as ``unroll.sgd(lr=η)``, but one that an estimator whose optimizer is fixed (PES) sees too.
Everything is float64 and deterministic in the problem's seed. ``device``: every tensor is built on the CPU (the
same generators, the same numbers on every device) and then moved there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import unroll
from unroll_examples.mnist_data import load_mnist

Params = Dict[str, Tensor]
Loss = Callable[[Params, Params], Tensor]
"""``loss(theta, phi) -> scalar``."""
Device = Union[str, torch.device]

DTYPE = torch.float64
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class Problem:
    """min over phi of outer(theta_K(phi), phi), theta_K = K steps of ``optimizer`` on inner(., phi) from theta0."""

    name: str
    inner: Loss
    outer: Loss
    theta0: Params
    phi0: Params
    K: int
    window: int                    # T: the truncation length, and the length of the windows PES/TBPTT step over
    test: Callable[[Params], float] = field(repr=False)  # a held-out score of theta_K (never used for training)
    description: str = ""
    optimizer: unroll.Optimizer = field(default_factory=lambda: unroll.sgd(lr=1.0))


def moved(params: Params, device: Device) -> Params:
    """``params`` on ``device`` (the same tensors when they are there already)."""
    return {name: value.to(device) for name, value in params.items()}


def fresh(phi: Params) -> Params:
    """Leaves that require grad, so one gradient is computed at phi and at nothing before it."""
    return {name: value.detach().clone().requires_grad_() for name, value in phi.items()}


def trained(problem: Problem, phi: Params, steps: Optional[int] = None) -> Params:
    """theta after ``steps`` (default K) inner steps at phi, as constants."""
    run = unroll.unrolled_params(problem.inner, problem.K if steps is None else steps, stop_grad=True,
                                 optimizer=problem.optimizer)
    with torch.no_grad():
        return run(problem.theta0, problem.optimizer.init(problem.theta0), phi)[0]


def final_outer_loss(problem: Problem, phi: Params) -> float:
    """outer(theta_K(phi), phi): what the outer optimisation minimises."""
    with torch.no_grad():
        return float(problem.outer(trained(problem, phi), phi))


# ------------------------------------------------------------------------------------------------ (a) hyperparameters


def hyperparameter(seed: int = 0, *, K: int = 300, window: int = 30, features: int = 50, n_train: int = 50,
                   n_val: int = 500, n_test: int = 2000, noise: float = 0.5, weight_decay: float = 0.01,
                   lr: float = 0.1, learn_lr: bool = True, device: Device = "cpu") -> Problem:
    """Ridge regression y = x·w + noise with as many features as training points, trained by K steps of full-batch
    gradient descent on L(w) = ½ mean((x w − y)²) + ½ λ ||w||², λ = exp(log_weight_decay); outer loss: the same
    squared error on a validation set. With ``learn_lr`` phi also holds log η (the step is w − η∇L).

    The minimiser of L is w*(λ) = (XᵀX/n + λI)⁻¹ Xᵀy/n (:func:`ridge_hypergradient` differentiates it in closed
    form); the eigenvalues of XᵀX/n reach down to ~0, so at λ = 0.01 the K steps stop well short of it
    (early stopping regularises as well) while at λ ≳ 0.1 they converge."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(features, generator=gen, dtype=DTYPE) / features ** 0.5

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, features, generator=gen, dtype=DTYPE)
        y = x @ w_true + noise * torch.randn(n, generator=gen, dtype=DTYPE)
        return x.to(device), y.to(device)

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = sample(n_train), sample(n_val), sample(n_test)

    def squared_error(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((x @ w - y) ** 2).mean()

    def inner(theta: Params, phi: Params) -> Tensor:
        w = theta["w"]
        loss = squared_error(w, x_train, y_train) + 0.5 * phi["log_weight_decay"].exp() * (w * w).sum()
        return loss * phi["log_lr"].exp() if "log_lr" in phi else loss

    def outer(theta: Params, phi: Params) -> Tensor:
        return squared_error(theta["w"], x_val, y_val)

    def test(theta: Params) -> float:
        return float(squared_error(theta["w"], x_test, y_test))

    phi0 = {"log_weight_decay": torch.tensor(math.log(weight_decay), dtype=DTYPE)}
    optimizer = unroll.sgd(lr=1.0 if learn_lr else lr)
    if learn_lr:
        phi0["log_lr"] = torch.tensor(math.log(lr), dtype=DTYPE)
    theta0 = {"w": torch.zeros(features, dtype=DTYPE)}
    return Problem("hyperparameter", inner, outer, moved(theta0, device), moved(phi0, device), K, window, test,
                   f"ridge regression, {features} features, {n_train} training / {n_val} validation points, "
                   f"K = {K} gradient-descent steps from w = 0; phi = "
                   f"{'(log weight decay, log learning rate)' if learn_lr else 'log weight decay'} at "
                   f"({weight_decay:g}{f', {lr:g}' if learn_lr else ''})", optimizer)


def ridge_hypergradient(problem: Problem, phi: Params) -> Tensor:
    """d/d log λ of the validation loss at the exact ridge minimiser w*(λ), in closed form (a check of the implicit
    estimator that shares no code with it): dw*/dλ = −A⁻¹ w*, A = XᵀX/n + λI, so the derivative is
    −λ (X_vᵀ(X_v w* − y_v)/n_v)ᵀ A⁻¹ w*. Reads the data back from ``problem``'s closures through its losses'
    gradients: A = ∇²L, Xᵀy/n = −∇L(0) (with η factored out)."""
    theta = {"w": torch.zeros_like(problem.theta0["w"])}
    lr = phi["log_lr"].exp() if "log_lr" in phi else torch.tensor(1.0, dtype=DTYPE, device=theta["w"].device)

    def inner_grad(w: Tensor) -> Tensor:
        return torch.func.grad(lambda v: problem.inner({"w": v}, phi))(w) / lr

    hessian = torch.func.jacfwd(inner_grad)(theta["w"])       # A, constant in w (quadratic loss)
    w_star = torch.linalg.solve(hessian, -inner_grad(torch.zeros_like(theta["w"])))
    outer_grad = torch.func.grad(lambda v: problem.outer({"w": v}, phi))(w_star)
    weight_decay = phi["log_weight_decay"].exp()
    return -weight_decay * outer_grad @ torch.linalg.solve(hessian, w_star)


# ------------------------------------------------------------------------------------------------ (b) distillation


def mnist_digits(split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """The MNIST test split (10,000 digits, md5-checked), 4x4-average-pooled to 7x7, normalised, in a fixed random
    order: (images [10000, 49], labels). Loaded with ``examples/unroll_examples/mnist_data.py``."""
    mnist = load_mnist("test", download=False)
    x = F.avg_pool2d(mnist.images.to(DTYPE).unsqueeze(1) / 255, 4).flatten(1)
    x = (x - MNIST_MEAN) / MNIST_STD
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    return x[order], mnist.labels[order]


def mlp(params: Params, x: Tensor) -> Tensor:
    return F.linear(torch.tanh(F.linear(x, params["w0"], params["b0"])), params["w1"], params["b1"])


def mlp_init(sizes: tuple[int, int, int], gen: torch.Generator) -> Params:
    (n_in, n_hidden, n_out) = sizes
    return {"w0": torch.randn(n_hidden, n_in, generator=gen, dtype=DTYPE) / n_in ** 0.5,
            "b0": torch.zeros(n_hidden, dtype=DTYPE),
            "w1": torch.randn(n_out, n_hidden, generator=gen, dtype=DTYPE) / n_hidden ** 0.5,
            "b1": torch.zeros(n_out, dtype=DTYPE)}


def distillation(seed: int = 0, *, K: int = 30, window: int = 10, digits: Optional[tuple[Tensor, Tensor]] = None,
                 hidden: int = 32, n_real: int = 500, n_test: int = 2000, lr: float = 0.3,
                 weight_decay: float = 1e-3, device: Device = "cpu") -> Problem:
    """Ten synthetic 7x7 images, one per class (phi, 490 numbers, started from random noise), train a 49-``hidden``-10
    tanh MLP from one fixed initialisation by K SGD steps (rate ``lr``) on the cross-entropy of the ten images
    plus ½·``weight_decay``·||θ||² (so that a minimiser exists); outer loss: cross-entropy of the trained MLP on
    ``n_real`` real digits. ``test``: its accuracy on ``n_test`` other digits. ``digits``: (images, labels) as
    :func:`mnist_digits` returns them (loaded once by the caller), default loaded here."""
    x, y = mnist_digits() if digits is None else digits
    x_real, y_real = x[:n_real].to(device), y[:n_real].to(device)
    x_test, y_test = x[n_real:n_real + n_test].to(device), y[n_real:n_real + n_test].to(device)
    gen = torch.Generator().manual_seed(seed)
    theta0 = mlp_init((x.shape[1], hidden, 10), gen)
    labels = torch.arange(10, device=device)

    def inner(theta: Params, phi: Params) -> Tensor:
        penalty = sum((p * p).sum() for p in theta.values())
        return lr * (F.cross_entropy(mlp(theta, phi["images"]), labels) + 0.5 * weight_decay * penalty)

    def outer(theta: Params, phi: Params) -> Tensor:
        return F.cross_entropy(mlp(theta, x_real), y_real)

    def test(theta: Params) -> float:
        return float((mlp(theta, x_test).argmax(1) == y_test).to(DTYPE).mean())

    phi0 = {"images": torch.randn(10, x.shape[1], generator=gen, dtype=DTYPE)}
    return Problem("distillation", inner, outer, moved(theta0, device), moved(phi0, device), K, window, test,
                   f"10 synthetic 7x7 images (490 outer parameters) train a 49-{hidden}-10 tanh MLP (fixed init) for "
                   f"K = {K} SGD steps at rate {lr:g}; outer loss: cross-entropy on {n_real} real MNIST test-split "
                   f"digits")


# ------------------------------------------------------------------------------------------------ (c) a GAN


def ring_of_gaussians(n: int, modes: int, gen: torch.Generator, radius: float = 2.0, std: float = 0.1) -> Tensor:
    angles = 2 * math.pi * torch.randint(modes, (n,), generator=gen).to(DTYPE) / modes
    centres = radius * torch.stack([angles.cos(), angles.sin()], 1)
    return centres + std * torch.randn(n, 2, generator=gen, dtype=DTYPE)


def gan(seed: int = 0, *, K: int = 40, window: int = 10, batch: int = 128, hidden: int = 16, modes: int = 4,
        lr: float = 0.5, device: Device = "cpu") -> Problem:
    """A generator (2-``hidden``-2 tanh MLP, phi) maps a fixed batch of Gaussian noise to 2-D points; a
    discriminator (2-``hidden``-1 tanh MLP, theta) is trained by K SGD steps (rate ``lr``) on the standard GAN loss
    inner = BCE(D(real), 1) + BCE(D(G(z)), 0) against a fixed batch of a ring of ``modes`` Gaussians; the outer loss
    is −inner at theta_K (zero-sum). A stationary point of the discriminator would need ∇inner = 0; with two fixed
    finite samples the discriminator keeps growing its weights to separate them, so there is none to stand on."""
    gen = torch.Generator().manual_seed(seed)
    real = ring_of_gaussians(batch, modes, gen).to(device)
    noise = torch.randn(batch, 2, generator=gen, dtype=DTYPE).to(device)
    phi0 = moved(mlp_init((2, hidden, 2), gen), device)
    theta0 = moved(mlp_init((2, hidden, 1), gen), device)
    ones, zeros = torch.ones(batch, dtype=DTYPE, device=device), torch.zeros(batch, dtype=DTYPE, device=device)

    def inner(theta: Params, phi: Params) -> Tensor:
        fake = mlp(phi, noise)
        return lr * (F.binary_cross_entropy_with_logits(mlp(theta, real).squeeze(1), ones)
                     + F.binary_cross_entropy_with_logits(mlp(theta, fake).squeeze(1), zeros))

    def outer(theta: Params, phi: Params) -> Tensor:
        return -inner(theta, phi) / lr

    def test(theta: Params) -> float:
        return float("nan")  # no held-out score: the GAN is compared on its gradients only

    return Problem("gan", inner, outer, theta0, phi0, K, window, test,
                   f"2-D GAN: generator 2-{hidden}-2 (phi, {sum(p.numel() for p in phi0.values())} numbers), "
                   f"discriminator 2-{hidden}-1 trained K = {K} SGD steps at rate {lr:g} on {batch} real points "
                   f"(ring of {modes} Gaussians) and {batch} generated ones; outer = −inner (zero-sum)")


MAKERS: Dict[str, Callable[..., Problem]] = {"hyperparameter": hyperparameter, "distillation": distillation,
                                             "gan": gan}
