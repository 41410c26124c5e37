"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, arXiv:2405.14867).

The student G is pushed along the difference of two scores at its noised samples: the teacher's ("real") and the
fake critic's, a denoiser continually fitted to G's own output distribution (DMD, Yin et al. 2024, arXiv:2311.18828,
Eq. 7). With x = G(z), t ~ U[t_min, t_max], x_t = alpha_t x + sigma_t eps:

    grad = ((x - x0_real(x_t)) - (x - x0_fake(x_t))) / mean_{C,H,W} |x - x0_real(x_t)|        (DMD Eq. 8)
    L_G  = 0.5 || x - sg(x - grad) ||^2        (so dL_G/dx = grad; no backprop through teacher or critic)

x0_real uses classifier-free guidance at scale `guidance`; x0_fake never does. The critic minimises the denoising
loss on detached student samples over all t (DMD2 Sec. 4.1). DMD2 drops DMD's regression loss and instead updates
the critic several times per generator update (the two time-scale update rule, Sec. 4.2); for multi-step students
it trains each step on the student's own rolled-out input (backward simulation, Sec. 4.5).

Checked against tianweiy/DMD2 ``main/sd_guidance.py`` (``compute_distribution_matching_loss``, ``compute_loss_fake``:
t in [0.02 T, 0.98 T], fake guidance asserted 1, the normaliser, nan_to_num, eps-MSE critic loss) and
``main/sd_unified_model.py`` (``sample_backward``). Not yet here: the GAN head on the critic's bottleneck (Sec. 4.3);
`loss` keeps the terms separate so it adds as one more term per role.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion.config import ConfigError
from distill_diffusion.data import Batch

from .base import Method, MethodConfig, randn


@dataclass
class DMD2Config(MethodConfig):
    guidance: float = 1.75  # teacher CFG scale for the real score (1.75 SD 1.5, 8 SDXL in the paper)
    critic_updates: int = 5  # critic updates per generator update (dfake_gen_update_ratio: 10 SD 1.5, 5 SDXL)
    t_min: float = 0.02  # generator-loss timesteps, as fractions of T (min_step_percent)
    t_max: float = 0.98  # (max_step_percent)
    backward_simulation: bool = True  # multi-step students train on their own rollouts
    critic_target: str = "native"  # critic loss space: native (the network's own: eps for SD) | epsilon | sample | ...

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance < 0:
            raise ConfigError(f"dmd2.guidance must be >= 0 (1 = no guidance), got {self.guidance}")
        if self.critic_updates < 1:
            raise ConfigError(f"dmd2.critic_updates must be >= 1, got {self.critic_updates}")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ConfigError(f"dmd2 needs 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        allowed = ("native", "epsilon", "v_prediction", "sample", "flow")
        if self.critic_target not in allowed:
            raise ConfigError(f"unknown dmd2.critic_target {self.critic_target!r}; "
                              f"choose one of: {', '.join(allowed)}")


class DMD2(Method):
    config_class = DMD2Config
    roles = ("student", "critic")

    def phase(self, step: int) -> str:
        """``critic_updates`` critic steps, then one generator step (the two time-scale update rule)."""
        return "student" if step % (self.cfg.critic_updates + 1) == self.cfg.critic_updates else "critic"

    def loss(self, phase: str, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        if phase == "student":
            return self.generator_loss(batch, generator)
        if phase == "critic":
            return self.critic_loss(batch, generator)
        raise ValueError(f"unknown phase {phase!r}; choose one of: student, critic")

    def student_sample(self, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """x = G(input): at a random step of the student's sampler when it has several (backward simulation)."""
        student = self.models.student
        k = 0
        if len(student.timesteps) > 1 and self.cfg.backward_simulation:
            k = int(torch.randint(0, len(student.timesteps), (1,), generator=generator, device=generator.device))
        x_in, t_in = student.rollout(batch.noise, batch.cond, k, generator)
        with torch.set_grad_enabled(grad):
            return student(x_in, t_in, batch.cond)

    def generator_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        m, cfg = self.models, self.cfg
        # 1. the student's sample, with gradient
        x = self.student_sample(batch, generator, grad=True)
        # 2. noise it at t ~ U{t_min T .. t_max T}
        t = m.process.sample_timesteps(len(x), cfg.t_min, cfg.t_max, generator)
        x_t = m.process.add_noise(x.detach(), randn(x.shape, generator, x), t)
        # 3. real (guided teacher) and fake (critic, unguided) denoised estimates; no gradient through either
        with torch.no_grad():
            x0_real = m.teacher.x0(x_t, t, batch.cond, cfg.guidance).double()
            x0_fake = m.critic(x_t, t, batch.cond).double()
            # 4. DMD Eq. 8: score difference, normalised per sample by the mean distance to the real estimate
            p_real = x.detach().double() - x0_real
            p_fake = x.detach().double() - x0_fake
            norm = p_real.abs().flatten(1).mean(1).clamp_min(1e-12).reshape(-1, *([1] * (x.ndim - 1)))
            grad = torch.nan_to_num((p_real - p_fake) / norm).to(x.dtype)
        # 5. a surrogate whose gradient with respect to x is `grad`
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        return loss, {"loss_dm": loss.item(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}

    def critic_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        m = self.models
        # 1. a detached student sample
        x = self.student_sample(batch, generator, grad=False).detach()
        # 2. noise it at t ~ U{0 .. T-1}
        t = m.process.sample_timesteps(len(x), 0.0, 1.0, generator)
        x_t = m.process.add_noise(x, randn(x.shape, generator, x), t)
        # 3. denoising loss of the critic (unguided), in its own prediction space by default (eps-MSE for SD)
        target = m.critic.prediction_type if self.cfg.critic_target == "native" else self.cfg.critic_target
        loss = m.process.denoising_loss(m.critic(x_t, t, batch.cond), x, x_t, t, target).mean()
        return loss, {"loss_critic": loss.item()}
