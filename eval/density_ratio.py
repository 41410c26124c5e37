"""How well a discriminator's logit estimates log r = log p_t / q_t on the mixture, where both densities are known.

f-distill (Xu et al. 2025) weights DMD's gradient at each noised student sample x_t by h(r), r = p_t(x_t) / q_t(x_t)
(the noised data density over the noised student density), and reads log r off a discriminator's logit
(`methods.score.ScoreMethod.f_weight`). On the mixture teacher p_t is analytic (class k is N(a mu_k, (a^2 s^2 +
sigma^2) I)), and q_t is the student's samples convolved with the noise kernel, estimated from a second draw of
student samples as mean_i N(x_t; a x_i, sigma^2 I): a kernel estimate whose bandwidth is the noise itself (no free
parameter), exact as the draw grows and good where sigma is not small against the samples' spacing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distill_diffusion.denoiser import Cond
from distill_diffusion.gmm import GaussianMixture


def log_noised_mixture(x_t: Tensor, mixture: GaussianMixture, a: Tensor, sigma: Tensor) -> Tensor:
    """log p_t(x_t) of the mixture noised as a x0 + sigma eps, (B,), float64."""
    v = a**2 * mixture.std**2 + sigma**2
    sq = ((x_t.double()[:, None, :] - a * mixture.means.double()[None]) ** 2).sum(-1)  # (B, K)
    log_k = mixture.weights.double().log()[None] - sq / (2 * v) - 0.5 * x_t.shape[1] * torch.log(2 * math.pi * v)
    return log_k.logsumexp(1)


def log_noised_samples(x_t: Tensor, x0: Tensor, a: Tensor, sigma: Tensor) -> Tensor:
    """log q_t(x_t) = log mean_i N(x_t; a x0_i, sigma^2 I), (B,), float64: the samples ``x0`` noised exactly."""
    sq = torch.cdist(x_t.double(), a * x0.double()) ** 2  # (B, M)
    log_k = -sq / (2 * sigma**2) - 0.5 * x_t.shape[1] * torch.log(2 * math.pi * sigma**2)
    return log_k.logsumexp(1) - math.log(x0.shape[0])


def ratio_agreement(models, t_fracs: list[float], n: int, seed: int = 11) -> list[dict]:  # noqa: ANN001
    """For each t (a fraction of T): the head's logit against the true log r at n noised student samples (an
    unconditional student). ``corr``: their correlation; ``slope``: the logit regressed on log r (1: calibrated);
    ``by_class``: per nearest class, (mean true log r, mean logit, samples); under-covered classes have log r > 0."""
    from distill_diffusion.methods import gan
    from distill_diffusion.preview import student_samples

    mixture, process = models.mixture, models.process

    def null(m: int) -> Cond:
        return Cond(labels=torch.full((m,), -1))

    with torch.no_grad():
        x = student_samples(models, null(n), n, seed=seed)  # the samples that are noised and weighted
        ref = student_samples(models, null(4 * n), 4 * n, seed=seed + 1)  # a second draw: the estimate of q_t
    classes = mixture.nearest(x)
    rows = []
    for frac in t_fracs:
        t = torch.full((n,), frac * process.num_train_timesteps)
        a, sigma = (v.double().squeeze() for v in process.alpha_sigma(t[:1], x[:1]))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
        x_t = (a * x.double() + sigma * noise).float()
        log_r = log_noised_mixture(x_t, mixture, a, sigma) - log_noised_samples(x_t, ref, a, sigma)
        with torch.no_grad():
            logit = gan.logits(models.critic, x_t, t, null(n)).double().flatten()
        lr, lg = log_r - log_r.mean(), logit - logit.mean()
        by_class = {int(k): (float(log_r[classes == k].mean()), float(logit[classes == k].mean()),
                             int((classes == k).sum())) for k in range(mixture.classes) if (classes == k).any()}
        rows.append({"t": frac, "sigma_over_alpha": float(sigma / a),
                     "corr": float((lr * lg).sum() / (lr.norm() * lg.norm()).clamp_min(1e-12)),
                     "slope": float((lr * lg).sum() / (lr * lr).sum().clamp_min(1e-12)),
                     "log_r_std": float(log_r.std()), "logit_std": float(logit.std()), "by_class": by_class})
    return rows
