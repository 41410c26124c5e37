"""SiD: Score identity Distillation (Zhou et al., ICML 2024, arXiv:2404.04057); guidance as in SiD-LSG
(Zhou et al. 2024, arXiv:2406.01561).

Like DMD2 the student is driven by the teacher's and the fake critic's denoised estimates at its noised samples,
but through a loss whose gradient flows through *both* networks into the sample (no stop-gradient), built from
Fisher-divergence score identities. With x = G(z), t ~ U[t_min, t_max], x_t = alpha_t x + sigma_t eps (x_t keeps
the graph), y_r = teacher x0(x_t) and y_f = critic x0(x_t):

    L_G = sum_{C,H,W} (y_r - y_f) . ((y_r - x) - alpha (y_r - y_f)) / w,    w = sg(mean_{C,H,W} |x - y_r|)

averaged over the batch (SiD Eq. 11 with its per-sample normaliser; alpha = 1.2 in the pixel-space experiments,
1 for Stable Diffusion, where the loss reduces to (y_r - y_f) . (y_f - x) / w). Samples with a NaN anywhere are
dropped. The critic is fitted to the student's samples by the usual denoising loss, one critic update per student
update (1:1 alternation), Adam betas (0, 0.999) for both (the reference's defaults).

SiDA (Zhou et al., ICLR 2025, arXiv:2410.14919) adds the GAN head of the shared critic (`methods/gan.py`,
``gan_student_weight`` / ``gan_critic_weight`` with real images in ``data.real``): the student's extra term is the
head's non-saturating loss at the *same* noised sample, logits clamped to [-10, 10], scaled per sample like SiD's
sum (times C*H*W) and divided by the same normaliser w:

    L_G += gan_student_weight * C*H*W * softplus(-D(x_t)) / w

SiDA sums the halves 0.5 / 0.5 after scaling the SiD loss by ``lsg`` 100 and the GAN loss by ``lsg_gan`` 0.01, so its
GAN : SiD ratio, this package's ``gan_student_weight``, is 1e-4 (its BCE is a batch mean divided per sample by w;
here each sample's own softplus is). Its critic adds the head's loss on noised real and student images, weighted by
EDM's lambda(sigma), beside a lambda-weighted denoising loss summed over C*H*W: about 1e-3 .. 1e-2 in this package's
per-element units (``gan_critic_weight``; DMD2's 1e-2). Checked against mingyuanzhou/SiD branch ``sida``,
``sida_training/sida_loss.py`` (``generator_share_encoder_loss``, ``fakescore_discriminator_share_encoder_loss``) and
``sida_training/sida_training_loop.py`` (the scales, the 0.5 / 0.5 sum). Differences (docs/methods.md, parity
table): SiDA reads its logit off the encoder output itself, here it is DMD2's small conv head on the bottleneck; SiDA
noises the critic's real and fake images with one draw, here each has its own; no lambda(sigma) on the head's loss;
no frozen-generator warm-up.

Guidance is kept in three places (SiD-LSG): the critic trains through ``critic_train_cfg`` (kappa_1), is
evaluated in the student's loss at ``critic_cfg`` (kappa_2 = kappa_3) and the teacher at ``teacher_cfg``
(kappa_4). SiD-LSG's SD student reads sqrt(1 - alpha_bar_625) z at t_init 625; students here read unscaled noise at
their first timestep (as the exported schedulers do), so the SD configs use 999; a multi-step student trains on its
own rollouts like every method of this family.

Checked against mingyuanzhou/SiD ``training/sid_loss.py`` (``generator_loss``: the loss, the NaN mask, the no-grad
normaliser clipped at 1e-5) and ``training/sid_training_loop.py`` (alternation, Adam betas, loss scaling);
REFERENCES 6.4 for SiD-LSG's kappas and the SD timestep range 20 .. 979.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch

from . import gan
from .score import ScoreConfig, ScoreMethod, per_sample_mean_abs


@dataclass
class SiDConfig(ScoreConfig):
    alpha: float = 1.2  # 1.2 in the paper's pixel-space experiments; 1.0 for Stable Diffusion (SiD-LSG)
    adam_betas: tuple[float, float] = field(default=(0.0, 0.999))  # the reference's Adam betas, both roles
    weight_decay: float = 0.0
    lr_student: float = 1e-6  # SD (SiD-LSG); 1e-5 for EDM pixel models
    lr_critic: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 2:
            raise ConfigError(f"sid.alpha must be in [0, 2] (1.2 pixel space, 1.0 Stable Diffusion), got {self.alpha}")


class SiD(ScoreMethod):
    config_class = SiDConfig

    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        # 1. the student's sample and its noised version, both keeping the graph back to the student
        x, critic_cond, k = self.score_sample(batch, generator, grad=True)
        x_t, t, _ = self.noised_at(x, k, generator)
        # 2. teacher and critic estimates with gradients through both networks (their weights do not update here)
        y_real = self.real_x0(x_t, t, batch.cond).float()
        y_fake = self.fake_x0(x_t, t, critic_cond).float()
        d = gan.logits(self.models.critic, x_t, t, batch.cond).float() if self.gan_student_now() else None
        x = x.float()
        # 3. drop samples with a NaN anywhere (the reference's per-sample mask)
        ok = ~(x.isnan() | y_real.isnan() | y_fake.isnan()).flatten(1).any(1)
        x, y_real, y_fake = x[ok], y_real[ok], y_fake[ok]
        # 4. SiD's loss, normalised per sample by the no-grad mean distance to the teacher's estimate
        with torch.no_grad():
            w = per_sample_mean_abs(x - y_real)
        diff = y_real - y_fake
        per_sample = (diff * ((y_real - x) - cfg.alpha * diff) / w).flatten(1).sum(1)
        h = self.f_weight(x_t, t, batch.cond)  # f-distill's density-ratio weight; None for reverse KL
        if h is not None:
            per_sample = per_sample * h[ok]
        logs = {"loss_sid": per_sample.mean().item() if len(per_sample) else 0.0, "sid_dropped": float((~ok).sum()),
                "score_gap": diff.flatten(1).norm(dim=1).mean().item() if len(diff) else 0.0, **self.f_logs}
        if d is not None:  # 5. SiDA: fool the head at the same x_t, in SiD's per-sample units
            gan_per_sample = F.softplus(-d[ok].clamp(-10, 10)) * x[0].numel() / w.flatten()
            logs["loss_gan_student"] = gan_per_sample.mean().item() if len(per_sample) else 0.0
            per_sample = per_sample + cfg.gan_student_weight * gan_per_sample
        loss = per_sample.mean() if len(per_sample) else x.sum() * 0
        return loss, logs
