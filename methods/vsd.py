"""VSD as SwiftBrush distils text-to-image models (Nguyen & Tran, CVPR 2024, arXiv:2312.05239), after
ProlificDreamer's variational score distillation (Wang et al. 2023, arXiv:2305.16213).

The student reads pure noise at t = 999 and predicts x0 in one step. With x = G(z), t ~ U{t_min T .. t_max T} and
x_t = alpha_t x + sigma_t eps, the student follows the epsilon-space VSD gradient

    grad = w(t) (eps_teacher(x_t) - eps_critic(x_t)),    w(t) = sigma_t^2 = 1 - alpha_bar_t
    L_G  = 0.5 || x - sg(x - grad) ||^2

with both networks under no_grad and classifier-free guidance on both at the same scale (``teacher_cfg`` and
``critic_cfg``, 4.5 in SwiftBrush). The critic is a LoRA adapter on the teacher's own UNet (the teacher is that
UNet with the adapter off; `distill_diffusion.lora`), trained 1:1 with the student by an alpha_t^2-weighted epsilon
loss, MSE(alpha_t eps_hat, alpha_t eps), with 10% of prompts replaced by the null prompt so its unconditional branch
learns too; its learning rate is far above the student's (1e-3 vs 1e-6).

Relation to DMD2: the same score difference (eps_t - eps_c = (alpha/sigma)(x0_c - x0_t)), weighted by sigma_t^2
instead of DMD's per-sample 1 / mean |x - x0_real|, a guided critic, and a LoRA instead of a full fake UNet.
``model.critic_lora_rank: 0`` gives VSD a full-weight critic; the same key gives DMD2 and SiD a LoRA one.

``student_weighting: dmd`` (not SwiftBrush's; `configs/gmm_flow_vsd.yaml`) replaces sigma_t^2 by DMD's per-sample
1 / mean |x - x0_teacher| on the x0 difference: on the flow path the 1-step student starts collapsed (its input at
t = 1000 carries no signal) and the fixed sigma^2 weighting escapes that only by chance (docs/BENCHMARKS.md).

Checked against VinAIResearch/SwiftBrush ``train_swiftbrush.py`` (timesteps 20 .. 980, ``1 - alphas_cumprod`` weight,
adapters switched off for the teacher, the LoRA loss and its null-prompt rate, learning rates, 1:1 updates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs

from .score import ScoreConfig, ScoreMethod, per_sample_mean_abs, uses_gan


@dataclass
class VSDConfig(ScoreConfig):
    teacher_cfg: float = 4.5  # SwiftBrush's CFG scale, on the teacher...
    critic_cfg: float = 4.5  # ...and on the LoRA critic
    critic_dropout: float = 0.1  # null prompts in the critic's loss
    critic_weighting: str = "alpha2"  # MSE(alpha_t eps_hat, alpha_t eps)
    # the student's weighting: sigma2 (SwiftBrush: w(t) = sigma_t^2 on the epsilon difference) or dmd (DMD's per-sample
    # 1 / mean |x - x0_teacher| on the x0 difference; not SwiftBrush's, for the flow path's collapsed start)
    student_weighting: str = "sigma2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_weighting not in ("sigma2", "dmd"):
            raise ConfigError(f"unknown vsd.student_weighting {self.student_weighting!r}; choose one of: sigma2, dmd")
    lr_student: float = 1e-6
    lr_critic: float = 1e-3
    weight_decay: float = 0.0


class VSD(ScoreMethod):
    config_class = VSDConfig

    @classmethod
    def needs(cls, cfg: VSDConfig) -> Needs:
        """SwiftBrush's critic: a rank-64 LoRA on the teacher's UNet (``model.critic_lora_rank`` overrides; 0 = a
        full copy)."""
        return Needs(critic="lora", critic_lora_rank=64,
                     real_images="the GAN head's real images" if uses_gan(cfg) else None)

    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        m, cfg = self.models, self.cfg
        x, critic_cond, k = self.score_sample(batch, generator, grad=True)
        x_t, t, _ = self.noised_at(x.detach(), k, generator)
        with torch.no_grad():
            x0_real, x0_fake = self.real_x0(x_t, t, batch.cond), self.fake_x0(x_t, t, critic_cond)
            if cfg.student_weighting == "dmd":  # DMD Eq. 8's normaliser on the same score difference
                grad = torch.nan_to_num((x0_fake - x0_real) / per_sample_mean_abs(x.detach() - x0_real)).to(x.dtype)
            else:
                eps_real = m.process.x0_to_eps(x0_real, x_t, t)
                eps_fake = m.process.x0_to_eps(x0_fake, x_t, t)
                _, sigma = m.process.alpha_sigma(t, eps_real)
                grad = torch.nan_to_num(sigma.pow(2) * (eps_real - eps_fake)).to(x.dtype)
            h = self.f_weight(x_t, t, batch.cond)  # f-distill's density-ratio weight; None for reverse KL
            grad = grad if h is None else grad * h.to(grad.dtype).reshape(-1, *([1] * (grad.ndim - 1)))
        loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
        logs = {"loss_vsd": loss.item(), "vsd_grad_norm": grad.flatten(1).norm(dim=1).mean().item(), **self.f_logs}
        loss = self.trajectory_term(loss, logs, x, k, batch)  # 6. the teacher's ODE from the same input, when on
        return self.add_gan_student(loss, logs, x, batch, generator), logs  # 7. the GAN head, when on
