"""Quickstart: the generator gradient of an unrolled GAN, both terms of Eq. 12 (Metz et al., 2017).

Runs in a second on a CPU:  python examples/quickstart.py
"""

import torch
from torch import nn
from torch.func import functional_call

import unroll

torch.manual_seed(0)
G = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
D = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
d_opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
real, z = torch.randn(64, 2), torch.randn(64, 8)


def d_loss(d_params, real, fake):
    """The discriminator's loss L_D = -log D(x) - log(1 - D(G(z))), on one batch of real and fake samples."""
    logits = functional_call(D, d_params, (torch.cat([real, fake]),))
    labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)])
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


# A few ordinary discriminator steps, so its Adam state is not fresh (Adam's very first step is sign-like,
# lr * g / |g|, and barely depends on the generator).
for _ in range(3):
    d_opt.zero_grad()
    d_loss(dict(D.named_parameters()), real, G(z).detach()).backward()
    d_opt.step()

# The unrolled steps continue from the discriminator's current torch.optim.Adam state.
inner_opt, d_state = unroll.from_torch(d_opt, D)
d_params = {name: p.detach() for name, p in D.named_parameters()}
fake = G(z)  # sample once: every unrolled step sees the same batch, and G's graph is built once


def generator_gradient(K: int, stop_grad: bool) -> torch.Tensor:
    surrogate = unroll.surrogate_loss(d_loss, K, stop_grad, optimizer=inner_opt)
    g_loss = surrogate(d_params, d_state, real, fake)  # = -L_D at theta_D^K (zero-sum game)
    grads = torch.autograd.grad(g_loss, list(G.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


for K in (0, 1, 5, 10):
    full, first_term = generator_gradient(K, False), generator_gradient(K, True)
    second_term = full - first_term
    print(f"K={K:2d}  |dfK/dθG| = {full.norm():.5f}   |first term| = {first_term.norm():.5f}   "
          f"|second term| = {second_term.norm():.5f}")
