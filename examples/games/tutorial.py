"""Unrolling for a non-GAN user, on the bilinear game min_x max_y x·y: the code of docs/tutorial_games.md.

    python examples/games/tutorial.py        # a second on a CPU; tests/test_games.py runs it
"""
import torch

import unroll

torch.set_default_dtype(torch.float64)


def f(x, y):
    """x minimises f, y maximises it; the only equilibrium is (0, 0)."""
    return x * y


lr = 0.2


def play(x_loss, steps=200):
    """Both players step at once from (1, 1): x descends x_loss(x, y), y ascends f(x, y).
    Returns the distance to the equilibrium after `steps` steps."""
    x, y = torch.tensor(1.0), torch.tensor(1.0)
    for _ in range(steps):
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        (gx,) = torch.autograd.grad(x_loss(x, y.detach()), x)
        (gy,) = torch.autograd.grad(f(x.detach(), y), y)
        x, y = x - lr * gx, y + lr * gy
    return torch.hypot(x, y).item()


distances = {"gradient descent-ascent": play(f)}


def y_loss(y_params, x):
    """The inner player's loss in unroll's form loss(params, *args): y maximises f, so it minimises -f."""
    return -f(x, y_params["y"])


def look_ahead(K, stop_grad=False):
    """x's loss f(x, y^K): y^K is y after K of its own gradient steps, differentiable in x."""
    surrogate = unroll.surrogate_loss(y_loss, K, stop_grad, optimizer=unroll.sgd(lr))
    state = unroll.sgd(lr).init({"y": torch.tensor(0.0)})  # plain SGD's state: a step counter
    return lambda x, y: surrogate({"y": y}, state, x)   # the default outer loss is -y_loss = f


for K in (1, 5):
    distances[f"look-ahead K={K}"] = play(look_ahead(K))
distances["look-ahead K=5, stop_grad"] = play(look_ahead(5, stop_grad=True))


cheap = unroll.extrapolated_surrogate_loss(y_loss, 5.0, optimizer=unroll.sgd(lr))
state = unroll.sgd(lr).init({"y": torch.tensor(0.0)})
distances["one step, extrapolated α=5"] = play(lambda x, y: cheap({"y": y}, state, x))


losses = {"x": lambda p: f(p["x"]["x"], p["y"]["y"]), "y": lambda p: -f(p["x"]["x"], p["y"]["y"])}
both_move = unroll.unrolled_game(losses, 5, optimizers={"x": unroll.sgd(lr), "y": unroll.sgd(lr)})
states = {"x": unroll.sgd(lr).init({"x": torch.tensor(0.0)}), "y": unroll.sgd(lr).init({"y": torch.tensor(0.0)})}


def recursive_loss(x, y):
    """f(x, y^5), where y^5 answers 5 joint steps in which x keeps learning too."""
    end, _ = both_move({"x": {"x": x}, "y": {"y": y}}, states)
    return f(x, end["y"]["y"])


distances["recursive K=5"] = play(recursive_loss)

for name, distance in distances.items():
    print(f"{name:28s} distance to (0, 0) after 200 steps: {distance:.2e}")
