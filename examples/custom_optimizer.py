"""Your own optimizer in a few lines: Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms",
Algorithm 2), unrolled by ``unroll.surrogate_loss`` to learn its learning rate.

    c_t = beta1 m_{t-1} + (1 - beta1) g_t,   theta_t = theta_{t-1} - lr (sign(c_t) + lambda theta_{t-1}),
    m_t = beta2 m_{t-1} + (1 - beta2) g_t.

sign() has a zero derivative, so the hypergradient flows through lr, the weight decay and theta itself, not
through the gradients. A few seconds on a CPU:  python examples/custom_optimizer.py
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

import unroll


def lion_rule(param: Tensor, grad: Tensor, buffers: Dict[str, Tensor], step: Tensor, *, lr: float | Tensor,
              beta1: float, beta2: float, weight_decay: float | Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One Lion step for one tensor; out-of-place operations only, so it can be differentiated."""
    exp_avg = buffers["exp_avg"]
    direction = torch.sign(torch.lerp(exp_avg, grad, 1 - beta1))
    new_param = param - lr * (direction + weight_decay * param)
    return new_param, {"exp_avg": torch.lerp(exp_avg, grad, 1 - beta2)}


def lion(lr: float | Tensor = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
         weight_decay: float | Tensor = 0.0) -> unroll.Optimizer:
    """Lion as an unroll optimizer (the paper's defaults); elementwise, so unrolls pack all tensors into one."""
    return unroll.custom_optimizer(lion_rule, name="lion", elementwise=True, buffers=("exp_avg",), lr=lr,
                                   beta1=betas[0], beta2=betas[1], weight_decay=weight_decay)


def main(K: int = 10, seed: int = 0) -> Dict[str, float]:
    """d(validation loss after K Lion steps) / d(log learning rate), by autograd and by a finite difference."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x_train, x_val = torch.randn(32, 4, dtype=torch.float64), torch.randn(256, 4, dtype=torch.float64)
    w_true = torch.randn(4, 1, dtype=torch.float64)
    y_train = x_train @ w_true + 0.1 * torch.randn(32, 1, dtype=torch.float64)
    y_val = x_val @ w_true
    params = {name: p.detach() for name, p in model.named_parameters()}

    def train_loss(params: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def validation_loss(log_lr: Tensor) -> Tensor:
        opt = lion(lr=log_lr.exp(), weight_decay=0.1)
        # The outer loss closes over the validation data; inner steps see the training data (args).
        surrogate = unroll.surrogate_loss(train_loss, K, optimizer=opt,
                                          outer_fn=lambda p, x, y: train_loss(p, x_val, y_val))
        return surrogate(params, opt.init(params), x_train, y_train)

    log_lr = torch.tensor(math.log(3e-3), dtype=torch.float64, requires_grad=True)
    value = validation_loss(log_lr)
    (hypergradient,) = torch.autograd.grad(value, log_lr)
    h = 1e-6
    with torch.no_grad():
        finite_difference = (validation_loss(log_lr + h) - validation_loss(log_lr - h)) / (2 * h)
    results = {"validation_loss": value.item(), "hypergradient": hypergradient.item(),
               "finite_difference": finite_difference.item()}
    print(f"validation loss after K={K} Lion steps: {results['validation_loss']:.5f}")
    print(f"d/d log(lr): autograd {results['hypergradient']:.6f}, finite difference "
          f"{results['finite_difference']:.6f}")
    return results


if __name__ == "__main__":
    main()
