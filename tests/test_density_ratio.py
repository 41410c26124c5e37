"""The exact noised-mixture density and the kernel estimate of a sample set's noised density
(`distill_diffusion.eval.density_ratio`), which measure whether the GAN head's logit is the log density ratio that
f-distill weights by."""

from __future__ import annotations

import math

import torch

from distill_diffusion.eval.density_ratio import log_noised_mixture, log_noised_samples
from distill_diffusion.gmm import GaussianMixture


def test_noised_mixture_density_is_a_normalised_mixture_of_gaussians() -> None:
    """One class: the closed-form Gaussian log density; four classes: it integrates to 1 over a grid."""
    a, sigma = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    one = GaussianMixture(torch.tensor([[1.0, -2.0]]), std=0.5)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = a**2 * 0.25 + sigma**2
    mean = a * torch.tensor([1.0, -2.0], dtype=torch.float64)
    want = -((x - mean) ** 2).sum(1) / (2 * v) - torch.log(2 * math.pi * v)
    torch.testing.assert_close(log_noised_mixture(x, one, a, sigma), want)
    four = GaussianMixture.ring(4, radius=2.0, std=0.5, weights=[0.6, 0.25, 0.1, 0.05])
    g = torch.linspace(-6, 6, 241, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    mass = log_noised_mixture(grid, four, a, sigma).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3, mass


def test_kernel_estimate_of_true_samples_matches_the_exact_density() -> None:
    """The noised density of true mixture samples, estimated from the samples, is the exact one where samples lie:
    log r of the data against itself is ~0 (|mean| < 0.03, spread < 0.1), and a class left out of the samples shows as
    log r > 1 at the points of that class."""
    mix = GaussianMixture.ring(4, radius=2.0, std=0.5, weights=[0.6, 0.25, 0.1, 0.05])
    gen = torch.Generator().manual_seed(0)
    labels = mix.draw_labels(20000, gen)
    x0 = mix.sample(labels, gen)
    a, sigma = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    probe_labels = mix.draw_labels(2000, gen)
    noise = torch.randn(2000, 2, generator=gen, dtype=torch.float64)
    probe = a * mix.sample(probe_labels, gen).double() + sigma * noise
    log_r = log_noised_mixture(probe, mix, a, sigma) - log_noised_samples(probe, x0, a, sigma)
    assert abs(log_r.mean().item()) < 0.03 and log_r.std().item() < 0.1, (log_r.mean(), log_r.std())
    without_3 = x0[labels != 3]
    log_r = log_noised_mixture(probe, mix, a, sigma) - log_noised_samples(probe, without_3, a, sigma)
    assert log_r[probe_labels == 3].mean() > 1 > log_r[probe_labels == 0].mean().abs(), log_r
