"""Quickstart: the generator gradient of an unrolled GAN, both terms of Eq. 12 (Metz et al., 2017).

    python examples/quickstart.py

About 4 s on a laptop CPU, half of it importing torch. Prints, for K = 0, 1, 5 and 10 unrolled discriminator
steps, the norm of the generator's gradient and of its two terms: the first (D held fixed at θ_D^K) and the
second (how the K discriminator updates respond to the generator), which is what fights mode collapse.
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


print("Generator gradient of the unrolled GAN loss f_K(θ_G, θ_D) = f(θ_G, θ_D^K(θ_G, θ_D)) (Eq. 12):")
print("  K   |df_K/dθ_G|   first term (θ_D^K fixed)   second term (through the K updates)")
for K in (0, 1, 5, 10):
    full, first_term = generator_gradient(K, False), generator_gradient(K, True)
    second_term = full - first_term
    print(f"{K:3d}   {full.norm():11.5f}   {first_term.norm():24.5f}   {second_term.norm():35.5f}")
print("K = 0 is the plain GAN gradient (no second term); the second term grows with K.")
