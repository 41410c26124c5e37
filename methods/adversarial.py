"""Adversarial distillation: LADD (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial
Diffusion Distillation", arXiv:2403.12015) and ADD (Sauer et al. 2023, arXiv:2311.17042).

The discriminator is the frozen teacher itself: a trainable head on its bottleneck features of a *noised* image
(`methods/gan.py`), so no external feature network (DINOv2, CLIP) is needed, which suits offline use. Real images and
student samples are noised at independent timesteps t ~ U[t_min T, t_max T] (LADD's ``gan_use_same_t_noise=False``):

    D loss = softplus(D(fake_t)) + softplus(-D(real_t))     (or hinge: relu(1 + D(fake_t)) + relu(1 - D(real_t)))
             + r1_weight * ||D(real_t) - D(real_t + r1_sigma n)||^2          (approximate R1, as FastGen's ``ladd``)
    student loss = softplus(-D(fake_t))                      (or hinge: -D(fake_t))

the student's gradient flowing through the frozen teacher's encoder into its sample. The student's input comes from
its own fixed timestep list (the list export uses, FastGen ``sample_from_t_list``): pure noise at the first, its own
rolled-out sample re-noised at the later ones (the backward simulation DMD2 uses), so training sees the inputs
inference sees. ``model.critic_lora_rank`` > 0 gives the discriminator body a LoRA adapter ("or the critic"), 0 a full
trainable copy; on the mixture teacher (no features) the body is the critic's MLP.

ADD adds its distillation term: the teacher denoises the re-noised student sample and the student is pulled towards
that, ``distill_weight * alpha_t * ||x - sg(teacher_x0^w(x_t))||^2`` (ADD Eq. 4 with c(t) = alpha_t, lambda = 2.5).

Checked against NVlabs/FastGen ``fastgen/methods`` (``ladd.py``: heads on frozen-teacher features, independent t for
real and fake, softplus losses, approximate R1, ``student_update_freq``) and NVlabs/Sana ``train_scm_ladd.py``
(hinge variant); ADD from the paper (no official code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs

from . import gan
from .base import AlternatingMethod, MethodConfig, noised

GAN_LOSSES = ("softplus", "hinge")


@dataclass
class LADDConfig(MethodConfig):
    lr_student: float = 1e-5
    lr_critic: float = 1e-4
    adam_betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    critic_updates: int = 1  # discriminator updates per student update (FastGen's student_update_freq 5 = 4 : 1)
    backward_simulation: bool = True  # multi-step students train on their own rollouts (inputs from their t list)
    gan_loss: str = "softplus"  # softplus | hinge
    t_min: float = 0.0  # discriminator noise levels, fractions of T
    t_max: float = 1.0
    r1_weight: float = 0.0  # approximate R1 (FastGen: 100 - 1000); 0 = off
    r1_sigma: float = 0.1
    distill_weight: float = 0.0  # ADD's distillation term (2.5 in ADD); 0 = pure LADD
    teacher_cfg: float = 1.0  # teacher CFG scale in the distillation term

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__.removesuffix("Config").lower()
        if self.critic_updates < 1:
            raise ConfigError(f"{name}.critic_updates must be >= 1, got {self.critic_updates}")
        if self.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"unknown {name}.gan_loss {self.gan_loss!r}; choose one of: {', '.join(GAN_LOSSES)}")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ConfigError(f"{name} needs 0 <= t_min <= t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}")
        if self.r1_weight < 0 or self.r1_sigma <= 0 or self.distill_weight < 0 or self.teacher_cfg < 0:
            raise ConfigError(f"{name}: r1_weight, distill_weight and teacher_cfg must be >= 0 and r1_sigma > 0")


@dataclass
class ADDConfig(LADDConfig):
    distill_weight: float = 2.5


class LADD(AlternatingMethod):
    config_class = LADDConfig

    @classmethod
    def needs(cls, cfg: LADDConfig) -> Needs:
        """The teacher's own frozen network as the discriminator's body, and real images."""
        return Needs(critic="teacher", real_images="the discriminator's real images")

    def __init__(self, cfg: LADDConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        gan.attach_head(models.critic, seed=models.seed + 2)

    def d(self, x_t: Tensor, t: Tensor, cond) -> Tensor:  # noqa: ANN001
        return gan.logits(self.models.critic, x_t, t, cond)

    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = self.student_sample(batch, generator, grad=True)
        fake_t, t, _ = noised(self.models.process, x, cfg.t_min, cfg.t_max, generator)
        d_fake = self.d(fake_t, t, batch.cond)
        loss_gan = F.softplus(-d_fake).mean() if cfg.gan_loss == "softplus" else -d_fake.mean()
        loss, logs = loss_gan, {"loss_gan_student": loss_gan.item()}
        if cfg.distill_weight > 0:
            loss_distill = self.distill_loss(x, batch, generator)
            loss = loss + cfg.distill_weight * loss_distill
            logs["loss_distill"] = loss_distill.item()
        return loss, logs

    def distill_loss(self, x: Tensor, batch: Batch, generator: torch.Generator) -> Tensor:
        """ADD: alpha_t-weighted distance of the sample to the teacher's denoising of its re-noised self."""
        m = self.models
        with torch.no_grad():
            x_t, t, _ = noised(m.process, x.detach(), 0.0, 1.0, generator)
            target = m.teacher.x0(x_t, t, batch.cond, self.cfg.teacher_cfg).to(x.dtype)
        alpha, _ = m.process.alpha_sigma(t, x.float())
        return (alpha.flatten() * (x.float() - target.float()).pow(2).flatten(1).mean(1)).mean()

    def critic_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        x = self.student_sample(batch, generator, grad=False).detach()
        fake_t, t_f, _ = noised(self.models.process, x, cfg.t_min, cfg.t_max, generator)  # the discriminator's t
        real_t, t_r, _ = noised(self.models.process, batch.real.to(x.dtype), cfg.t_min, cfg.t_max, generator)
        d_fake = self.d(fake_t, t_f, batch.cond)
        d_real = self.d(real_t, t_r, batch.real_cond)
        if cfg.gan_loss == "softplus":
            loss = (F.softplus(d_fake) + F.softplus(-d_real)).mean()
        else:
            loss = (F.relu(1 + d_fake) + F.relu(1 - d_real)).mean()
        logs = {"loss_gan_critic": loss.item(), "d_real": d_real.mean().item(), "d_fake": d_fake.mean().item()}
        if cfg.r1_weight > 0:
            jitter = real_t + cfg.r1_sigma * draws.randn(real_t.shape, generator, real_t)
            r1 = (d_real - self.d(jitter, t_r, batch.real_cond)).pow(2).mean()
            loss = loss + cfg.r1_weight * r1
            logs["r1"] = r1.item()
        return loss, logs


class ADD(LADD):
    config_class = ADDConfig
