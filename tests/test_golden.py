"""Golden tests: each method's loss, and its gradient with respect to the student, against an independent
transcription of the reference code's formula on fixed tensors (tiny SD 1.5 UNets, fixed seeds).

The transcriptions follow the reference files in the reference's own terms (the UNets' epsilon predictions,
``alphas_cumprod``, the reference's CFG form and time range), not this package's x0 convention, so a wrong sign,
weight, normaliser or time range in a method shows as a mismatch. They draw from the same generator in the same
order as the method does (this package's draws), so the comparison is exact up to float rounding. Each reference
file and line is named where it is transcribed; the snapshots are listed in docs/methods.md (parity tables), which
also lists the perturbations these tests were seen to catch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.assembly import Run, assemble
from distill_diffusion.methods import gan

N = 2  # batch
T999 = torch.full((N,), 999)


def tiny_run(method: str, args: dict | None = None, **model: object) -> Run:
    """A run on tiny SD 1.5 whose critic (when there is one) is no longer the teacher, so real and fake differ."""
    cfg = make_config(method, "tiny:sd15", args=args, model={"timesteps": [999], **model},
                      train={"batch_size": N}, data={"real": "digits"})
    run = assemble(cfg, train=True)
    critic = run.models.critic
    if critic is not None:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(7)
            for p in critic.parameters():
                if p.requires_grad:
                    p.add_(0.02 * torch.randn_like(p))
    return run


def student_grads(loss: Tensor, run: Run) -> list[Tensor]:
    params = [p for p in run.models.student.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def assert_same(ours: tuple[Tensor, list[Tensor]], ref: tuple[Tensor, list[Tensor]], rtol: float = 2e-4) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = ours, ref
    torch.testing.assert_close(loss_a.double(), loss_b.double(), rtol=rtol, atol=1e-7)
    flat_a = torch.cat([g.flatten() for g in grads_a if g is not None]).double()
    flat_b = torch.cat([g.flatten() for g in grads_b if g is not None]).double()
    assert flat_a.norm() > 0
    assert (flat_a - flat_b).norm() <= rtol * flat_b.norm() + 1e-9, (float((flat_a - flat_b).norm()),
                                                                      float(flat_b.norm()))


def eps_of(unet: torch.nn.Module, x_t: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
    return unet(x_t, t, encoder_hidden_states=embeds).sample


def cfg_eps(unet: torch.nn.Module, x_t: Tensor, t: Tensor, cond, scale: float) -> Tensor:  # noqa: ANN001
    """Imagen-form CFG on epsilon, as DMD2 (``predict_noise`` + guidance), SwiftBrush and SiD-LSG write it."""
    if scale == 1.0:
        return eps_of(unet, x_t, t, cond.embeds)
    e_c, e_u = eps_of(unet, x_t, t, cond.embeds), eps_of(unet, x_t, t, cond.uncond.embeds)
    return e_u + scale * (e_c - e_u)


def abar(run: Run, t: Tensor) -> Tensor:
    return run.models.pipeline.scheduler.alphas_cumprod[t].double().reshape(-1, 1, 1, 1)


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor) -> Tensor:
    """``get_x0_from_noise`` (tianweiy/DMD2 ``main/utils.py``): (x_t - sqrt(1 - abar) eps) / sqrt(abar), in double."""
    return (x_t.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()


def sample_and_noise(run: Run, batch, t_lo: int, t_hi: int, generator: torch.Generator):  # noqa: ANN001, ANN201
    """The 1-step student's sample with gradient, then the reference's ``randint(t_lo, t_hi)`` and noise."""
    x = run.models.student(batch.noise, T999, batch.cond)
    t = draws.randint(t_lo, t_hi, N, generator)
    noise = draws.randn(x.shape, generator)
    return x, t, noise


# ------------------------------------------------------------------------------------------------ score family
def test_dmd2_student_loss_is_the_reference_distribution_matching_loss() -> None:
    """tianweiy/DMD2 ``main/sd_guidance.py`` ``compute_distribution_matching_loss`` (lines 170-245): t ~
    randint(20, 981), x0 of the fake UNet (no CFG) and of the real UNet (CFG 1.75), p = x - x0,
    grad = (p_real - p_fake) / mean|p_real|, loss = 0.5 mse(x, sg(x - grad))."""
    run = tiny_run("dmd2", {"teacher_cfg": 1.75})
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    ours = (loss, student_grads(loss, run))

    m, g = run.models, torch.Generator().manual_seed(1)
    x, t, noise = sample_and_noise(run, batch, 20, 981, g)
    with torch.no_grad():
        a = abar(run, t)
        x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
        x0_fake = x0_from_eps(x_t, eps_of(m.critic.net, x_t, t, batch.cond.embeds), a)
        x0_real = x0_from_eps(x_t, cfg_eps(m.teacher.denoiser.net, x_t, t, batch.cond, 1.75), a)
        p_real, p_fake = x.double() - x0_real, x.double() - x0_fake
        grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    ref_loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)))


def test_sid_student_loss_is_the_reference_sid_lsg_generator_loss() -> None:
    """mingyuanzhou/SiD-LSG ``training/sid_training_loop.py`` (generator loss, lines 484-530): t ~ randint(20, 980),
    y_real = teacher x0 (CFG kappa_4), y_fake = critic x0 (CFG kappa_2), both with gradient into x;
    w = mean|x - y_real| (no gradient, clipped at 1e-5); loss = sum_CHW (y_r - y_f)((y_r - x) - alpha (y_r - y_f)) / w,
    summed and divided by the batch."""
    alpha = 1.2
    run = tiny_run("sid", {"alpha": alpha, "teacher_cfg": 1.5, "critic_cfg": 2.0, "t_max": 0.979})
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    ours = (loss, student_grads(loss, run))

    m, g = run.models, torch.Generator().manual_seed(1)
    x, t, noise = sample_and_noise(run, batch, 20, 980, g)
    a = abar(run, t)
    x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
    y_real = x0_from_eps(x_t, cfg_eps(m.teacher.denoiser.net, x_t, t, batch.cond, 1.5), a)
    y_fake = x0_from_eps(x_t, cfg_eps(m.critic.net, x_t, t, batch.cond, 2.0), a)
    images = x.double()
    with torch.no_grad():
        weight_factor = (images - y_real).abs().mean(dim=[1, 2, 3], keepdim=True).clip(min=1e-5)
    ref = (y_real - y_fake) * ((y_real - images) - alpha * (y_real - y_fake)) / weight_factor
    ref_loss = ref.sum() / N
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)), rtol=1e-3)


def test_vsd_student_loss_is_the_reference_swiftbrush_loss() -> None:
    """VinAIResearch/SwiftBrush ``train_swiftbrush.py`` (lines 757-786): t ~ randint(20, 981); teacher and LoRA
    critic both under CFG 4.5 on epsilon; score_gradient = nan_to_num(sigma_t^2 (eps_teacher - eps_lora)) with
    sigma_t^2 = 1 - alpha_bar_t; loss = 0.5 mse(x, sg(x - score_gradient))."""
    run = tiny_run("vsd", {"teacher_cfg": 4.5, "critic_cfg": 4.5}, critic_lora_rank=4)
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    ours = (loss, student_grads(loss, run))

    m, g = run.models, torch.Generator().manual_seed(1)
    x, t, noise = sample_and_noise(run, batch, 20, 981, g)
    with torch.no_grad():
        a = abar(run, t)
        x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
        # the teacher's UNet is the LoRA critic's base: the teacher computes with the adapter off, the critic on
        eps_teacher = _eps_with_adapter(m.teacher.denoiser, x_t, t, batch.cond, 4.5)
        eps_lora = _eps_with_adapter(m.critic, x_t, t, batch.cond, 4.5)
        score_gradient = torch.nan_to_num((1 - a).float() * (eps_teacher - eps_lora))
    ref_loss = 0.5 * F.mse_loss(x.float(), (x - score_gradient).detach().float())
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)))


def _eps_with_adapter(denoiser, x_t: Tensor, t: Tensor, cond, scale: float) -> Tensor:  # noqa: ANN001
    """A shared UNet's epsilon with the role's adapter (or none, for the teacher), as SwiftBrush switches peft
    adapters: ``Denoiser.raw`` is the network's own output."""
    e_c = denoiser.raw(x_t, t, cond)
    e_u = denoiser.raw(x_t, t, type(cond)(embeds=cond.uncond.embeds))
    return e_u + scale * (e_c - e_u)


@pytest.mark.parametrize("method", ["dmd2", "vsd"])
def test_the_gan_student_term_is_the_reference_softplus(method: str) -> None:
    """tianweiy/DMD2 ``compute_generator_clean_cls_loss``: the student's GAN term is
    ``gan_student_weight * softplus(-D(x_t)).mean()`` at t ~ randint(0, 1000), added to the student's loss."""
    base = {"teacher_cfg": 1.0, "critic_cfg": 1.0} if method == "vsd" else {}
    run = tiny_run(method, {**base, "gan_student_weight": 0.3, "gan_critic_weight": 1e-2})
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    run.method.loss("student", batch, torch.Generator().manual_seed(1), step=1)  # sets the GAN on
    with_gan, logs = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    run.method._gan_now = False
    without, _ = run.method.student_loss(batch, torch.Generator().manual_seed(1))
    m, g = run.models, torch.Generator().manual_seed(1)
    x, _, _ = sample_and_noise(run, batch, 20, 981, g)  # the student loss's own draws come first
    t = draws.randint(0, 1000, N, g)
    noise = draws.randn(x.shape, g)
    a = abar(run, t)
    x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
    ref_gan = F.softplus(-gan.logits(m.critic, x_t, t, batch.cond)).mean()
    torch.testing.assert_close(with_gan - without, 0.3 * ref_gan, rtol=1e-4, atol=1e-7)
    assert logs["loss_gan_student"] == pytest.approx(float(ref_gan.detach()), rel=1e-4)


def test_critic_losses_are_the_reference_denoising_losses() -> None:
    """The critics' own losses on detached student samples, t ~ randint(0, 1000): DMD2's ``compute_loss_fake``
    (tianweiy/DMD2 ``main/sd_guidance.py`` 271-296: unweighted epsilon MSE) and SwiftBrush's LoRA loss
    (``train_swiftbrush.py`` 806-822: ``mse(alpha_t eps_lora, alpha_t eps)``, alpha_t = sqrt(alpha_bar_t))."""
    for method, args, weight in (("dmd2", {}, lambda a: torch.ones_like(a)),
                                 ("vsd", {"critic_dropout": 0.0}, lambda a: a)):
        run = tiny_run(method, args, critic_lora_rank=4 if method == "vsd" else 0)
        batch = run.data.sample(N, torch.Generator().manual_seed(0))
        loss, _ = run.method.critic_loss(batch, torch.Generator().manual_seed(1))
        m, g = run.models, torch.Generator().manual_seed(1)
        with torch.no_grad():
            x = m.student(batch.noise, T999, batch.cond)
        t = draws.randint(0, 1000, N, g)
        noise = draws.randn(x.shape, g)
        a = abar(run, t)
        x_t = (a.sqrt() * x + (1 - a).sqrt() * noise).float()
        eps = m.critic.raw(x_t, t, batch.cond)
        ref = (weight(a).float() * (eps.float() - noise) ** 2).mean()
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------------ trajectory family
def lcm_scalings(t: Tensor, sigma_data: float = 0.5, scale: float = 10.0) -> tuple[Tensor, Tensor]:
    """diffusers ``scalings_for_boundary_conditions`` (``train_lcm_distill_sd_wds.py`` 343-347)."""
    s = t.double() * scale
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip.reshape(-1, 1, 1, 1), c_out.reshape(-1, 1, 1, 1)


def test_consistency_loss_is_the_reference_lcm_loss() -> None:
    """diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``: the DDIM grid (k = T / N), the
    online student's boundary-scaled x0 at t_n+k, one guided teacher DDIM step in LCM's CFG form
    ``cond + w (cond - uncond)`` with w = s - 1 for this package's (Imagen) scale s (1321-1322), the target
    network's boundary-scaled x0 at t_n, pseudo-Huber loss with c = 0.001 (1357)."""
    run = tiny_run("consistency", {"teacher_cfg": 2.0, "teacher_cfg_max": 4.0, "grid_steps": 10})
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.loss("student", batch, torch.Generator().manual_seed(1))
    ours = (loss, student_grads(loss, run))

    m, g = run.models, torch.Generator().manual_seed(1)
    unet, student_unet = m.teacher.denoiser.net, m.student.denoiser.net
    ddim_timesteps = torch.arange(1, 11) * 100 - 1  # (arange(1, N + 1) * T / N).round() - 1
    latents, cond = batch.real, batch.real_cond
    index = draws.randint(0, 10, N, g)
    start = ddim_timesteps[index]
    prev = (start - 100).clamp_min(0)
    noise = draws.randn(latents.shape, g)
    s = 2.0 + 2.0 * draws.rand(N, g)  # this package's scale; LCM's w is s - 1
    w = (s - 1).double().reshape(-1, 1, 1, 1)
    a_start, a_prev = abar(run, start), abar(run, prev)
    noisy = (a_start.sqrt() * latents + (1 - a_start).sqrt() * noise).float()
    c_skip_start, c_out_start = lcm_scalings(start)
    model_pred = c_skip_start * noisy + c_out_start * x0_from_eps(noisy, eps_of(student_unet, noisy, start,
                                                                                cond.embeds), a_start)
    with torch.no_grad():
        e_c, e_u = eps_of(unet, noisy, start, cond.embeds), eps_of(unet, noisy, start, cond.uncond.embeds)
        x_c, x_u = x0_from_eps(noisy, e_c, a_start), x0_from_eps(noisy, e_u, a_start)
        pred_x0, pred_eps = x_c + w * (x_c - x_u), e_c.double() + w * (e_c.double() - e_u.double())
        x_prev = (a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_eps).float()  # DDIMSolver.ddim_step
        c_skip, c_out = lcm_scalings(prev)
        target = c_skip * x_prev + c_out * x0_from_eps(x_prev, eps_of(student_unet, x_prev, prev, cond.embeds),
                                                        a_prev)  # the EMA target equals the student at the start
    ref_loss = (torch.sqrt((model_pred.float() - target.float()) ** 2 + 0.001**2) - 0.001).mean()
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)), rtol=1e-3)


def test_progressive_loss_is_the_reference_distillation_loss() -> None:
    """google-research ``diffusion_distillation/dpm.py`` (``training_losses`` with a teacher): two teacher DDIM steps
    t -> t' -> t'' on the teacher's 2N-step grid, the x-target whose one student DDIM step lands at z_t'',
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t), and the ``snr_trunc`` weight
    max(x-MSE, eps-MSE) per sample, eps-MSE from the same x error (eps = (z_t - alpha_t x) / sigma_t)."""
    from diffusers import DDIMScheduler

    run = tiny_run("progressive", {"teacher_cfg": 1.5, "start_steps": 4}, timesteps=[999, 499])
    batch = run.data.sample(N, torch.Generator().manual_seed(0))
    loss, _ = run.method.loss("student", batch, torch.Generator().manual_seed(2))
    ours = (loss, student_grads(loss, run))

    m, g = run.models, torch.Generator().manual_seed(2)
    unet, student_unet = m.teacher.denoiser.net, m.student.denoiser.net
    grid = DDIMScheduler.from_config(m.pipeline.scheduler.config, timestep_spacing="trailing")
    grid.set_timesteps(4)
    times = list(grid.timesteps.tolist()) + [-1]  # [999, 749, 499, 249] then the data
    x, cond = batch.real, batch.real_cond
    i = draws.randint(0, 2, N, g)
    assert sorted(i.tolist()) == [0, 1]  # one sample ends its two teacher steps at 499, one at the data
    t, t_mid, t_end = (torch.tensor([times[2 * k + j] for k in i.tolist()]) for j in range(3))
    noise = draws.randn(x.shape, g)

    def alpha_sigma(tt: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.where(tt.reshape(-1, 1, 1, 1) < 0, torch.ones(1, dtype=torch.float64), abar(run, tt.clamp_min(0)))
        return a.sqrt(), (1 - a).sqrt()

    def teacher_ddim(z: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        e_c, e_u = eps_of(unet, z, t_from, cond.embeds), eps_of(unet, z, t_from, cond.uncond.embeds)
        eps = e_u.double() + 1.5 * (e_c.double() - e_u.double())
        a_f, s_f = alpha_sigma(t_from)
        a_t, s_t = alpha_sigma(t_to)
        x_pred = (z.double() - s_f * eps) / a_f
        return (a_t * x_pred + s_t * eps).float()

    a_t, s_t = alpha_sigma(t)
    z_t = (a_t * x + s_t * noise).float()
    with torch.no_grad():
        z_end = teacher_ddim(teacher_ddim(z_t, t, t_mid), t_mid, t_end)
        a_e, s_e = alpha_sigma(t_end)
        frac = s_e / s_t
        x_target = (z_end.double() - frac * z_t.double()) / (a_e - frac * a_t)
    x_student = x0_from_eps(z_t, eps_of(student_unet, z_t, t, cond.embeds), a_t**2)
    x_mse = ((x_student - x_target) ** 2).mean(dim=[1, 2, 3])
    eps_error = (z_t.double() - a_t * x_student) / s_t - (z_t.double() - a_t * x_target) / s_t
    eps_mse = (eps_error**2).mean(dim=[1, 2, 3])
    ref_loss = torch.maximum(x_mse, eps_mse).mean()
    assert_same(ours, (ref_loss, student_grads(ref_loss, run)), rtol=1e-3)
