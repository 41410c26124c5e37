"""Golden tests of the adversarial family (LADD, ADD): each loss and its gradient against an independent transcription
of the reference formula on fixed tensors, drawing from the same generator in the same order (see test_golden.py).

References: NVlabs/FastGen ``fastgen/methods/distribution_matching/ladd.py`` (the student and discriminator updates,
independent t and noise for real and fake when ``gan_use_same_t_noise`` is off, the approximate R1 of
``_compute_r1_regularization``) with ``fastgen/methods/common_loss.py`` (``gan_loss_generator`` softplus(-f),
``gan_loss_discriminator`` softplus(f) + softplus(-r), batch means); ADD (Sauer et al. 2023, arXiv:2311.17042,
Sec. 3.2-3.3: hinge loss, the distillation term c(t) d(x, teacher(x_t)) with c(t) = alpha_t and d the squared
distance, teacher t uniform over its training steps). The discriminator D (the frozen teacher's encoder and a
trained head, `methods/gan.py`) is the architecture, not the loss: the transcriptions call it as it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_golden import T999, N, abar, assert_same, cfg_eps, student_grads, tiny_run, x0_from_eps
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.assembly import Run
from distill_diffusion.methods import gan

T_MIN, T_MAX = 0.1, 0.6  # a range other than the default [0, 1], so a method that ignores it is seen


def noise_at(run: Run, x: Tensor, lo: int, hi: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The reference's ``t = randint(lo, hi)`` then ``forward_process(x, eps, t)``, in double, back to float."""
    t = draws.randint(lo, hi, len(x), g)
    eps = draws.randn(x.shape, g)
    a = abar(run, t)
    return (a.sqrt() * x.double() + (1 - a).sqrt() * eps.double()).float(), t


def d_of(run: Run, x_t: Tensor, t: Tensor, cond) -> Tensor:  # noqa: ANN001
    return gan.logits(run.models.critic, x_t, t, cond)


def student_loss_and_reference_draws(run: Run):  # noqa: ANN201
    """The method's student loss with its gradients, then the reference's draws from the same generator: the 1-step
    student's sample with gradient, re-noised at t in [t_min T, t_max T] (T_MIN, T_MAX), and D of it.
    Returns (batch, (loss, grads), logs, x, D(x_t), the generator for further draws)."""
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, logs = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x = run.models.student(batch.noise, T999, batch.cond)
    fake_t, t = noise_at(run, x, int(T_MIN * 1000), int(T_MAX * 1000) + 1, g)
    return batch, (loss, student_grads(loss, run)), logs, x, d_of(run, fake_t, t, batch.cond), g


@pytest.mark.parametrize("gan_loss", ["softplus", "hinge"])
def test_ladd_student_loss_is_the_reference_generator_loss(gan_loss: str) -> None:
    """FastGen ``_student_update_step``: the student's sample re-noised at t ~ U[t_min T, t_max T] (integers, as
    ``sample_timesteps``), loss softplus(-D(x_t)).mean(); ADD's hinge form -D(x_t).mean()."""
    run = tiny_run("ladd", {"gan_loss": gan_loss, "t_min": T_MIN, "t_max": T_MAX})
    batch, ours, _, x, d_fake, _ = student_loss_and_reference_draws(run)
    ref_loss = F.softplus(-d_fake).mean() if gan_loss == "softplus" else -d_fake.mean()
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)))


def test_add_student_loss_adds_the_alpha_weighted_distillation_term() -> None:
    """ADD Eq. 4-5: L = L_adv + lambda * c(t) ||x - sg(teacher_x0^w(x_t))||^2 (mean over pixels), lambda 2.5,
    c(t) = alpha_t = sqrt(alpha_bar_t), the teacher's t uniform over [0, T) whatever the discriminator's range, the
    teacher under CFG w (Imagen form on epsilon)."""
    run = tiny_run("add", {"gan_loss": "hinge", "t_min": T_MIN, "t_max": T_MAX, "distill_weight": 2.5,
                           "teacher_cfg": 3.0})
    batch, ours, logs, x, d_fake, g = student_loss_and_reference_draws(run)
    loss_adv = -d_fake.mean()
    with torch.no_grad():
        x_t, t2 = noise_at(run, x.detach(), 0, 1000, g)
        a = abar(run, t2)
        target = x0_from_eps(x_t, cfg_eps(run.models.teacher.denoiser.net, x_t, t2, batch.cond, 3.0), a)
    c_t = a.sqrt().flatten()
    loss_distill = (c_t * ((x.double() - target) ** 2).mean(dim=[1, 2, 3])).mean()
    ref_loss = loss_adv + 2.5 * loss_distill
    assert logs["loss_distill"] == pytest.approx(float(loss_distill.detach()), rel=1e-4)
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)))


def head_grads(loss: Tensor, run: Run) -> list[Tensor]:
    params = [p for p in run.models.critic.gan_head.parameters()]
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize(("gan_loss", "r1_weight"), [("softplus", 0.0), ("softplus", 100.0), ("hinge", 10.0)])
def test_ladd_discriminator_loss_is_the_reference_loss(gan_loss: str, r1_weight: float) -> None:
    """FastGen ``_discriminator_update_step``: the detached student sample and a real image, each noised at its own
    t ~ U[t_min T, t_max T] and noise (``gan_use_same_t_noise=False``), loss softplus(D(fake)).mean() +
    softplus(-D(real)).mean() (ADD: relu(1 + D(fake)) + relu(1 - D(real))), plus ``r1_weight`` times the approximate
    R1 mse(D(real_t), D(real_t + sigma n)) with sigma 0.1.

    Deliberate difference: FastGen jitters the *clean* real image and feeds it at t_real (clean + 0.1 n where the
    discriminator otherwise sees a noised image); here the jitter is on the discriminator's own input, the noised
    real image, as APT's approximate R1 (Lin et al. 2025) states it: D(x) against D(x + sigma n)."""
    run = tiny_run("ladd", {"gan_loss": gan_loss, "t_min": T_MIN, "t_max": T_MAX, "r1_weight": r1_weight})
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.critic_loss(batch, torch.Generator().manual_seed(1))
    ours = (loss, head_grads(loss, run))

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = run.models.student(batch.noise, T999, batch.cond)
    fake_t, t_f = noise_at(run, x, 100, 601, g)
    real_t, t_r = noise_at(run, batch.real, 100, 601, g)
    d_fake, d_real = d_of(run, fake_t, t_f, batch.cond), d_of(run, real_t, t_r, batch.real_cond)
    if gan_loss == "softplus":
        ref_loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
    else:
        ref_loss = F.relu(1 + d_fake).mean() + F.relu(1 - d_real).mean()
    if r1_weight > 0:
        jittered = real_t + 0.1 * draws.randn(real_t.shape, g)
        ref_loss = ref_loss + r1_weight * F.mse_loss(d_real, d_of(run, jittered, t_r, batch.real_cond))
    assert_same(ours, (ref_loss, head_grads(ref_loss, run)))
