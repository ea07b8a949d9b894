"""Learn a weight decay by differentiating the validation loss through K training steps (docs/tutorial.md).

A linear model with as many features as training points overfits their noise; weight decay helps, but how much?
Instead of a grid search, take the gradient of the validation loss after K unrolled SGD steps with respect to
log(weight decay), the short-horizon hypergradient of Luketina et al. (2016) (Maclaurin et al., 2015, and
Franceschi et al., 2017, differentiate through whole training runs).

The script is the tutorial's code: (1) a plain torch.optim loop, (2) the same training continued in `unroll`
while the weight decay is learned (`from_torch`, `surrogate_loss`), (3) back to torch.optim (`to_torch`), and a
control run that keeps the initial weight decay. A few seconds on a CPU:  python examples/meta_learning.py
"""

from __future__ import annotations

import argparse
import math
from typing import Dict

import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll


def main(warmup_steps: int = 50, meta_steps: int = 60, final_steps: int = 50, K: int = 10,
         seed: int = 0) -> Dict[str, float]:
    torch.manual_seed(seed)
    features, n_train, n_val = 40, 40, 500
    w_true = torch.randn(features, 1) / features ** 0.5
    x_train, x_val = torch.randn(n_train, features), torch.randn(n_val, features)
    y_train = x_train @ w_true + 0.5 * torch.randn(n_train, 1)
    y_val = x_val @ w_true + 0.5 * torch.randn(n_val, 1)
    model = nn.Linear(features, 1)
    control = nn.Linear(features, 1)
    control.load_state_dict(model.state_dict())

    # --- 1. a plain torch.optim training loop
    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(model(x), y)

    torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(warmup_steps):
        torch_opt.zero_grad()
        loss_fn(model, x_train, y_train).backward()
        torch_opt.step()

    # --- 2. continue in unroll, learning the weight decay
    def train_loss(params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    base, state = unroll.from_torch(torch_opt, model)  # SGD's hyperparameters and its momentum buffers
    params = {name: p.detach() for name, p in model.named_parameters()}
    log_wd = torch.tensor(math.log(1e-3), requires_grad=True)
    meta_opt = torch.optim.Adam([log_wd], lr=0.1)

    def sgd_with(weight_decay: float | Tensor) -> unroll.Optimizer:
        return unroll.sgd(**{**base.hyperparams, "weight_decay": weight_decay})

    for _ in range(meta_steps):
        # The hypergradient: d (validation loss at theta^K) / d log_wd, through K SGD steps from where training is.
        surrogate = unroll.surrogate_loss(train_loss, K, optimizer=sgd_with(log_wd.exp()),
                                          outer_fn=train_loss)
        meta_opt.zero_grad()
        surrogate(params, state, x_train, y_train, outer_args=(x_val, y_val)).backward()
        meta_opt.step()
        # The real training step, with the updated weight decay as a plain number (nothing to differentiate).
        committed = sgd_with(log_wd.exp().item())
        params, state, _ = unroll.train_step(train_loss, optimizer=committed)(params, state, x_train, y_train)

    # --- 3. back to torch.optim with the learned weight decay
    torch_opt.param_groups[0]["weight_decay"] = committed.hyperparams["weight_decay"]
    unroll.to_torch(committed, state, torch_opt, model, params=params)  # momentum buffers and the trained weights
    for _ in range(final_steps):
        torch_opt.zero_grad()
        loss_fn(model, x_train, y_train).backward()
        torch_opt.step()

    # --- control: the same number of plain torch.optim steps with the initial weight decay
    control_opt = torch.optim.SGD(control.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(warmup_steps + meta_steps + final_steps):
        control_opt.zero_grad()
        loss_fn(control, x_train, y_train).backward()
        control_opt.step()

    with torch.no_grad():
        results = {"learned_weight_decay": committed.hyperparams["weight_decay"],
                   "validation_loss": loss_fn(model, x_val, y_val).item(),
                   "control_validation_loss": loss_fn(control, x_val, y_val).item(),
                   "train_loss": loss_fn(model, x_train, y_train).item(),
                   "control_train_loss": loss_fn(control, x_train, y_train).item()}
    print(f"weight decay: 1e-3 -> learned {results['learned_weight_decay']:.4f}")
    print(f"validation loss: {results['validation_loss']:.4f} (control with weight decay 1e-3: "
          f"{results['control_validation_loss']:.4f})")
    print(f"training loss:   {results['train_loss']:.4f} (control: {results['control_train_loss']:.4f})")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=10, help="unrolled steps per hypergradient")
    parser.add_argument("--meta-steps", type=int, default=60, help="training steps that also learn the weight decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main(meta_steps=args.meta_steps, K=args.K, seed=args.seed)
