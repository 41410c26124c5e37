"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv:2405.14867).

The student G is pushed along the difference of two scores at its noised samples: the teacher's ("real") and the
fake critic's, a denoiser continually fitted to G's own output distribution (DMD, Yin et al. 2024, arXiv:2311.18828,
Eq. 7). With x = G(z), t ~ U[t_min, t_max], x_t = alpha_t x + sigma_t eps:

    grad = ((x - x0_real(x_t)) - (x - x0_fake(x_t))) / mean_{C,H,W} |x - x0_real(x_t)|        (DMD Eq. 8)
    L_G  = 0.5 || x - sg(x - grad) ||^2        (so dL_G/dx = grad; no backprop through teacher or critic)

x0_real uses classifier-free guidance at scale ``teacher_cfg``; x0_fake never does (the reference asserts fake guidance
1). The critic minimises the denoising loss on detached student samples over all t (Sec. 4.1), several times per
student update (the two time-scale update rule, Sec. 4.2); multi-step students train each step on their own
rolled-out input (backward simulation, Sec. 4.5; `ScoreMethod.student_sample`).

GAN (Sec. 4.3, `methods/gan.py`): a head on the critic's bottleneck tells noised real images from noised student
samples. The critic adds ``gan_critic_weight * [softplus(D(fake)) + softplus(-D(real))]`` to its denoising loss; the
student adds ``gan_student_weight * softplus(-D(G(z)_t))``, its gradient flowing through the (frozen) critic.
Both weights 0 (the default) make the method data-free. ``gan_start`` switches the GAN on at that many student
updates and ``stage2_lr_student`` / ``stage2_lr_critic`` set both roles' learning rates from then on: the paper's
two-stage SD 1.5 schedule (stage 1 at lr 1e-5 for both without GAN; stage 2 with GAN 1e-3 / 1e-2 at lr 5e-7 for
both, tianweiy/DMD2 ``experiments/sdv1.5/laion6.25_sd_baseline_8node_guidance1.75_lr5e-7_seed10_dfake10_
diffusion1000_gan1e-3_noode_resume_fixdata.sh``) in one config (``configs/sd15_dmd2_two_stage.yaml``). Deviation:
the reference restarts stage 2 from the stage-1 weights with fresh optimizer states (``--ckpt_only_path``); here the
Adam states carry over, since one run holds both stages.

Checked against tianweiy/DMD2 ``main/sd_guidance.py`` (``compute_distribution_matching_loss``, ``compute_loss_fake``,
``compute_generator_clean_cls_loss``, ``compute_guidance_clean_cls_loss``: t in [0.02 T, 0.98 T], the normaliser,
nan_to_num, eps-MSE critic loss, cls weights 1e-3 / 1e-2) and ``main/sd_unified_model.py`` (``sample_backward``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion.denoiser import Cond
from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch

from .base import noised_groups
from .score import ScoreConfig, ScoreMethod, per_sample_mean_abs


@dataclass
class DMD2Config(ScoreConfig):
    teacher_cfg: float = 1.75  # teacher CFG scale for the real score (1.75 SD 1.5, 8 SDXL in the paper)
    critic_updates: int = 5  # critic updates per student update (dfake_gen_update_ratio: 10 SD 1.5, 5 SDXL)
    # the GAN weights (ScoreConfig): 1e-3 SD 1.5 stage 2, 5e-3 SDXL, 3e-3 ImageNet for the student; 1e-2 critic
    stage2_lr_student: float | None = None  # the student's learning rate from `gan_start` on (5e-7 for SD 1.5)
    stage2_lr_critic: float | None = None  # the critic's learning rate from `gan_start` on (5e-7 for SD 1.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.critic_cfg != 1 or self.critic_train_cfg != 1:
            raise ConfigError("dmd2 evaluates and trains the critic without guidance (the reference asserts fake "
                              "guidance 1): leave critic_cfg and critic_train_cfg at 1, or use sid")
        for key in ("stage2_lr_student", "stage2_lr_critic"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"dmd2.{key} must be > 0 (or null), got {getattr(self, key)}")


class DMD2(ScoreMethod):
    config_class = DMD2Config

    def lr_at(self, role: str, step: int) -> float:
        stage2 = {"student": self.cfg.stage2_lr_student, "critic": self.cfg.stage2_lr_critic}[role]
        return stage2 if stage2 is not None and self.gan_on(step) else self.lr(role)

    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        m, cfg = self.models, self.cfg
        # 1. the student's sample, with gradient
        x, critic_cond, k = self.score_sample(batch, generator, grad=True)
        # 2. noise it at t ~ U{t_min T .. t_max T}
        x_t, t, _ = self.noised_at(x.detach(), k, generator)
        # 3. real (guided teacher) and fake (critic, unguided) denoised estimates; no gradient through either. The
        # critic runs in full precision, outside any autocast, as the reference's fake UNet does here
        with torch.no_grad():
            decoupled = cfg.cfg_times == "decoupled" and cfg.teacher_cfg != 1
            if decoupled:  # the unguided teacher here; guidance's own term below, at its own noise level
                x0_u, x0_cond = self.teacher_pair(x_t, t, batch)
                x0_real = x0_u + cfg.teacher_cfg * (x0_cond - x0_u)  # for the normaliser only, as DMD2's
            else:
                x0_real = x0_cond = self.real_x0(x_t, t, batch.cond).double()
            with torch.autocast(x_t.device.type, enabled=False):
                x0_fake = m.critic(x_t.float(), t, critic_cond).double()
            # 4. DMD Eq. 8: score difference, normalised per sample by the mean distance to the real estimate
            p_real = x.detach().double() - x0_real
            grad = torch.nan_to_num((x0_fake - x0_cond) / per_sample_mean_abs(p_real))
            h = self.f_weight(x_t, t, batch.cond)  # f-distill's density-ratio weight; None for reverse KL
            grad = grad if h is None else grad * h.double().reshape(-1, *([1] * (grad.ndim - 1)))
            if decoupled:
                grad = grad + self.guidance_term(x.detach(), k, batch, generator)
            grad = grad.to(x.dtype)
        # 5. a surrogate whose gradient with respect to x is `grad`
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        logs = {"loss_dm": loss.item(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item(), **self.f_logs}
        loss = self.trajectory_term(loss, logs, x, k, batch)  # 6. the teacher's ODE from the same input, when on
        return self.add_gan_student(loss, logs, x, batch, generator), logs  # 7. the GAN head, when on

    def teacher_pair(self, x_t: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """The teacher's unconditional and conditional x0 at (x_t, t), float64, in one batch."""
        cond = batch.cond
        if cond.uncond is None:
            raise ConfigError("dmd2.cfg_times decoupled needs the null prompt (cond.uncond) for guidance")
        plain = {"uncond": None, "cfg_scale": None}
        both = Cond.cat([replace(cond.uncond, **plain), replace(cond, **plain)])
        x0 = self.models.teacher.x0(torch.cat([x_t, x_t]), torch.cat([t, t]), both).double()
        return x0.chunk(2)

    def guidance_term(self, x: Tensor, k: int | Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        """Decoupled DMD's CFG-augmentation term (Liu et al. 2025, arXiv:2511.22677, Eq. 8 and Algorithm 1): the
        guided teacher's pull -(w - 1)(x0_c - x0_u) at its own noise level tau ~ U[t_min, t_k] (never noisier than
        the student step's own input t_k; the whole range for a 1-step student), normalised like DMD's term by the
        mean distance to the guided estimate there. At tau = the DM term's t this plus that term is DMD2's gradient."""
        m, cfg = self.models, self.cfg
        s = cfg.t_shift

        def bounds(j: int) -> tuple[float, float]:
            top = float(m.student.timesteps[j]) / m.process.num_train_timesteps
            top = top / (s - (s - 1) * top)  # back through a flow path's shift, as `step_range`
            return cfg.t_min, max(cfg.t_min, min(cfg.t_max, top))

        x_t, t, _ = noised_groups(m.process, x, k, bounds, generator, s)
        x0_u, x0_c = self.teacher_pair(x_t, t, batch)
        x0_guided = x0_u + cfg.teacher_cfg * (x0_c - x0_u)
        norm = per_sample_mean_abs(x.double() - x0_guided)
        return torch.nan_to_num(-(cfg.teacher_cfg - 1) * (x0_c - x0_u) / norm)
