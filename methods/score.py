"""What the score-distillation family shares: DMD2, SiD and VSD each drive the student by the disagreement of the
teacher ("real score") and a fake critic fitted to the student's own samples. They differ only in the student
loss; this module holds the rest.

- `ScoreConfig`: teacher / critic CFG scales kept separate (SiD-LSG's kappas: the critic trains through
  ``critic_train_cfg`` and is evaluated in the student's loss at ``critic_cfg``; the teacher at ``teacher_cfg``), the
  critic's prompt dropout, the update ratio, the student-loss timestep range.
- `ScoreMethod.critic_loss`: the critic's denoising loss on detached student samples, t over the whole range
  (DMD2 ``compute_loss_fake``; SiD ``SID_EDMLoss.__call__``; SwiftBrush's LoRA loss with 10% null prompts and
  an alpha_t^2 weight on the epsilon error).

The critic is a full copy of the teacher or, with ``model.critic_lora_rank``, a LoRA adapter on the teacher's own
weights (`distill_diffusion.lora`): every method here gets either through config. Likewise the GAN head on the
critic's bottleneck (DMD2 Sec. 4.3, `methods/gan.py`): ``gan_critic_weight`` adds its classification loss on noised
real vs student images to the critic's loss here, for every method; each method adds the student's side
(``gan_student_weight``) in its own units (DMD2 and VSD: the mean softplus, SiD: SiDA's per-sample form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.denoiser import Cond, cfg_x0
from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs

from . import gan
from .base import AlternatingMethod, MethodConfig, noised

CRITIC_TARGETS = ("native", "epsilon", "v_prediction", "sample", "flow")


@dataclass
class ScoreConfig(MethodConfig):
    teacher_cfg: float = 1.0  # teacher CFG scale in the student's loss (1 = none)
    critic_cfg: float = 1.0  # CFG on the critic in the student's loss (SiD-LSG kappa_2; SwiftBrush = teacher_cfg)
    critic_train_cfg: float = 1.0  # CFG the critic's own denoising loss is computed through (SiD-LSG kappa_1)
    critic_dropout: float = 0.0  # fraction of critic-training rows given the null prompt (SwiftBrush 0.1)
    critic_updates: int = 1  # critic updates per student update
    t_min: float = 0.02  # student-loss timesteps, fractions of T (20 .. 980: DMD2, SwiftBrush; SiD-LSG 20 .. 979)
    t_max: float = 0.98
    critic_t_min: float = 0.0  # critic-loss timesteps (0 .. 999: DMD2, SwiftBrush; SiD-LSG 20 .. 979)
    critic_t_max: float = 1.0
    # flow teachers: both ranges' draws mapped through SD3's shift s u / (1 + (s - 1) u) (FastGen's "shifted"
    # density); 1 = uniform, the only value a vp teacher takes
    t_shift: float = 1.0
    backward_simulation: bool = True  # multi-step students train on their own rollouts
    critic_target: str = "native"  # critic loss space: native (the network's own: eps for SD) | epsilon | ...
    critic_weighting: str = "uniform"  # uniform | alpha2 (SwiftBrush: MSE(alpha_t eps_hat, alpha_t eps))
    gan_student_weight: float = 0.0  # student's GAN weight (DMD2: 1e-3 SD 1.5 stage 2, 5e-3 SDXL; SiDA: 1)
    gan_critic_weight: float = 0.0  # critic's GAN weight beside its per-element denoising loss (DMD2: 1e-2); 0 = off
    gan_start: int = 0  # student updates before the GAN terms switch on (stage 2 of DMD2's SD 1.5 schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__.removesuffix("Config").lower()
        for key in ("teacher_cfg", "critic_cfg", "critic_train_cfg"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key} must be >= 0 (1 = no guidance), got {getattr(self, key)}")
        if not 0 <= self.critic_dropout < 1:
            raise ConfigError(f"{name}.critic_dropout must be in [0, 1), got {self.critic_dropout}")
        if self.critic_updates < 1:
            raise ConfigError(f"{name}.critic_updates must be >= 1, got {self.critic_updates}")
        for lo, hi in (("t_min", "t_max"), ("critic_t_min", "critic_t_max")):
            if not 0 <= getattr(self, lo) <= getattr(self, hi) <= 1:
                raise ConfigError(f"{name} needs 0 <= {lo} <= {hi} <= 1, got {lo}={getattr(self, lo)}, "
                                  f"{hi}={getattr(self, hi)}")
        if not self.t_shift > 0:
            raise ConfigError(f"{name}.t_shift must be > 0 (1: uniform timesteps), got {self.t_shift}")
        if self.critic_target not in CRITIC_TARGETS:
            raise ConfigError(f"unknown {name}.critic_target {self.critic_target!r}; "
                              f"choose one of: {', '.join(CRITIC_TARGETS)}")
        if self.critic_weighting not in ("uniform", "alpha2"):
            raise ConfigError(f"unknown {name}.critic_weighting {self.critic_weighting!r}; choose one of: "
                              "uniform, alpha2")
        if self.gan_student_weight < 0 or self.gan_critic_weight < 0 or self.gan_start < 0:
            raise ConfigError(f"{name}.gan_student_weight, gan_critic_weight and gan_start must be >= 0")


def drop_prompts(cond: Cond, p: float, generator: torch.Generator) -> Cond:
    """Each row replaced by its null-prompt (``cond.uncond``) row with probability ``p`` (classifier-free training)."""
    if p == 0:
        return cond
    if cond.uncond is None:
        raise ConfigError("critic_dropout needs unconditional conditioning (the null prompt / null class)")
    drop = draws.rand(cond.batch_size, generator) < p
    return cond.where(drop, cond.uncond)


class ScoreMethod(AlternatingMethod):
    """Critic updates and student updates in the ratio ``critic_updates`` : 1; subclasses give `student_loss`."""

    config_class = ScoreConfig

    @classmethod
    def needs(cls, cfg: ScoreConfig) -> Needs:
        """A full copy of the teacher as the critic; real images when the GAN head is on."""
        return Needs(critic="copy", real_images="the GAN head's real images" if uses_gan(cfg) else None)

    def __init__(self, cfg: ScoreConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        if cfg.t_shift != 1.0 and models.process.kind != "flow":
            name = type(cfg).__name__.removesuffix("Config").lower()
            raise ConfigError(f"{name}.t_shift ({cfg.t_shift}) shifts a flow-matching teacher's timesteps; this "
                              f"teacher's noise process is {models.process.kind!r}: set it to 1")
        self.use_gan = uses_gan(cfg)
        self._gan_now = False
        if self.use_gan:
            gan.attach_head(models.critic, seed=models.seed + 2)

    def student_updates(self, step: int) -> int:
        """How many student updates come before train step ``step``."""
        return step // (self.cfg.critic_updates + 1)

    def gan_on(self, step: int) -> bool:
        return self.use_gan and self.student_updates(step) >= self.cfg.gan_start

    def gan_student_now(self) -> bool:
        """Whether the student's loss takes its GAN term at this step."""
        return self._gan_now and self.cfg.gan_student_weight > 0

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        self._gan_now = self.gan_on(step)
        return super().loss(phase, batch, generator, step)

    def add_gan_student(self, loss: Tensor, logs: dict[str, float], x: Tensor, batch: Batch,
                        generator: torch.Generator) -> Tensor:
        """``loss`` plus ``gan_student_weight * mean softplus(-D(x_t))`` when the GAN is on, x_t = x noised at
        t ~ U[0, T): fool the head, the gradient flowing through the (frozen) critic's encoder into x (DMD2
        ``compute_generator_clean_cls_loss``). SiD adds its own per-sample form instead."""
        if not self.gan_student_now():
            return loss
        fake_t, t, _ = noised(self.models.process, x, 0.0, 1.0, generator)
        loss_gan = F.softplus(-gan.logits(self.models.critic, fake_t, t, batch.cond)).mean()
        logs["loss_gan_student"] = loss_gan.item()
        return loss + self.cfg.gan_student_weight * loss_gan

    def real_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.models.teacher.x0(x_t, t, cond, self.cfg.teacher_cfg)

    def fake_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return cfg_x0(self.models.critic, x_t, t, cond, self.cfg.critic_cfg)

    def critic_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x = self.student_sample(batch, generator, grad=False).detach()
        loss, logs = self.critic_denoising_loss(x, batch.cond, generator)
        if self._gan_now and self.cfg.gan_critic_weight > 0:  # the head tells noised real from noised student images
            m = self.models
            fake_t, t_f, _ = noised(m.process, x, 0.0, 1.0, generator)
            real_t, t_r, _ = noised(m.process, batch.real.to(x.dtype), 0.0, 1.0, generator)
            d_fake = gan.logits(m.critic, fake_t, t_f, batch.cond)
            d_real = gan.logits(m.critic, real_t, t_r, batch.real_cond)
            loss_gan = (F.softplus(d_fake) + F.softplus(-d_real)).mean()
            loss = loss + self.cfg.gan_critic_weight * loss_gan
            logs.update(loss_gan_critic=loss_gan.item(), d_real=d_real.mean().item(), d_fake=d_fake.mean().item())
        return loss, logs

    def critic_denoising_loss(self, x: Tensor, cond: Cond, generator: torch.Generator
                              ) -> tuple[Tensor, dict[str, float]]:
        """The critic's denoising loss on the (detached) student samples ``x``, t uniform over the fractions
        [critic_t_min, critic_t_max] of T (all of [0, T) by default)."""
        m, cfg = self.models, self.cfg
        x_t, t, _ = noised(m.process, x, cfg.critic_t_min, cfg.critic_t_max, generator, cfg.t_shift)
        cond = drop_prompts(cond, cfg.critic_dropout, generator)
        x0_hat = cfg_x0(m.critic, x_t, t, cond, cfg.critic_train_cfg)
        target = m.critic.prediction_type if cfg.critic_target == "native" else cfg.critic_target
        per_sample = m.process.denoising_loss(x0_hat, x, x_t, t, target)
        if cfg.critic_weighting == "alpha2":
            alpha, _ = m.process.alpha_sigma(t, per_sample)
            per_sample = alpha.pow(2) * per_sample
        loss = per_sample.mean()
        return loss, {"loss_critic": loss.item()}


def uses_gan(cfg: ScoreConfig) -> bool:
    """Whether the critic carries the GAN head (either side's weight is set)."""
    return cfg.gan_student_weight > 0 or cfg.gan_critic_weight > 0


def per_sample_mean_abs(x: Tensor) -> Tensor:
    """mean_{C,H,W} |x| per sample, shaped to broadcast against x, never below 1e-5 (DMD and SiD's normaliser)."""
    return x.abs().flatten(1).mean(1).clamp_min(1e-5).reshape(-1, *([1] * (x.ndim - 1)))
