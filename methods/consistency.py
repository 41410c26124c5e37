"""Consistency distillation in latent space: LCM (Luo et al. 2023, arXiv:2310.04378), after Song et al.'s
consistency models (ICML 2023, arXiv:2303.01469, Alg. 2).

The student f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) is trained to give the same answer at two adjacent
points of the teacher's probability-flow ODE. On a DDIM grid of ``grid_steps`` timesteps (LCM: 50, so k = T / 50 =
20; ``skip`` grid intervals per solver step):

    x0 ~ data, t_n+k = grid[i], t_n = max(t_n+k - k, 0), x = alpha x0 + sigma eps at t_n+k
    x_prev  = DDIM(teacher_x0^w(x, t_n+k), x, t_n+k -> t_n)            one guided teacher step (LCM Eq. 9)
    L       = d( f_theta(x, t_n+k),  sg f_target(x_prev, t_n) )        d: pseudo-Huber sqrt(r^2 + c^2) - c, or L2

with the boundary scalings c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5 (so
f(x, 0) = x), the teacher guided at w ~ U[teacher_cfg, teacher_cfg_max] (Imagen convention: 1 = none), which a
student with ``model.cfg_embedding_dim`` also reads (LCM's w-embedding: it then samples at any w of the range), the
target network an EMA of the student (decay 0.95) or, for a LoRA student, the online student itself under no_grad
(LCM-LoRA). At the student's own timesteps (>= 159) c_skip < 1e-7, so the exported LCMScheduler samples exactly what
the student learns.
The student samples with the multistep (re-noise) sampler, as LCMScheduler does.

Checked against diffusers ``examples/consistency_distillation/train_lcm_distill_sd_wds.py`` and
``train_lcm_distill_lora_sd_wds.py`` (DDIMSolver grid, ``scalings_for_boundary_conditions``, guided x0 and eps,
``huber_c`` 0.001, ``ema_decay`` 0.95, w range, lr 1e-6 full / 1e-4 LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.errors import ConfigError
from distill_diffusion.lora import SharedDenoiser
from distill_diffusion.roles import Batch, Needs

from .base import EMATarget, Method, MethodConfig, default_student_cfg, draw_cfg_scales, student_cond

LOSSES = ("huber", "l2")


@dataclass
class ConsistencyConfig(MethodConfig):
    lr_student: float = 1e-6  # LCM: 1e-6 full weights, 1e-4 for a LoRA student
    weight_decay: float = 0.0
    grid_steps: int = 50  # the DDIM solver's grid (LCM's num_ddim_timesteps): k = skip * T / grid_steps
    skip: int = 1  # grid intervals the teacher solver jumps per step
    teacher_cfg: float = 1.0  # teacher CFG scale (Imagen convention, 1 = none); the range's low end with the max
    teacher_cfg_max: float | None = None  # w ~ U[teacher_cfg, teacher_cfg_max] per sample (LCM: U[5, 15], SD 1.5)
    student_cfg: float | None = None  # the scale a student that reads it samples at by default (null: teacher_cfg)
    loss: str = "huber"  # huber (pseudo-Huber) | l2
    huber_c: float = 1e-3
    target_ema: float | None = None  # target = EMA of the student; null: 0.95, or 0 (the online student) for LoRA
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_steps < 1 or self.skip < 1 or self.skip >= self.grid_steps:
            raise ConfigError(f"consistency needs grid_steps >= 1 and 1 <= skip < grid_steps, got grid_steps="
                              f"{self.grid_steps}, skip={self.skip}")
        if self.teacher_cfg < 0 or (self.teacher_cfg_max is not None and self.teacher_cfg_max < self.teacher_cfg):
            raise ConfigError(f"consistency.teacher_cfg must be >= 0 and teacher_cfg_max (if set) >= teacher_cfg, got "
                              f"{self.teacher_cfg} and {self.teacher_cfg_max}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown consistency.loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.huber_c <= 0 or self.sigma_data <= 0 or self.timestep_scaling <= 0:
            raise ConfigError("consistency.huber_c, sigma_data and timestep_scaling must be > 0")
        if self.target_ema is not None and not 0 <= self.target_ema < 1:
            raise ConfigError(f"consistency.target_ema must be in [0, 1) or null, got {self.target_ema}")


class Consistency(Method):
    config_class = ConsistencyConfig

    @classmethod
    def needs(cls, cfg: ConsistencyConfig) -> Needs:
        """Real data to noise; a copy of the student (the EMA target); a student that may read its CFG scale."""
        return Needs(real_images="consistency distillation noises real data", copies_student=True,
                     student_reads_cfg=True, student_cfg=default_student_cfg(cfg))

    def __init__(self, cfg: ConsistencyConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        process = models.process
        T = process.num_train_timesteps
        self.k = cfg.skip * (T // cfg.grid_steps)
        # LCM's grid: (1..N) * T/N - 1, i.e. {19, 39, ..., 999} for N = 50; the solver steps k down from each. On a
        # flow teacher the grid is (1..N) * T/N, {20.0, ..., 1000.0}: its last point is pure noise (sigma 1), as
        # diffusers' FlowMatchLCMScheduler places it; the solver's DDIM step is then the Euler step of the flow ODE.
        points = [(i + 1) * (T // cfg.grid_steps) for i in range(cfg.grid_steps)]
        self.grid = [p - 1 for p in points] if process.kind == "vp" else [float(p) for p in points]
        lora = isinstance(models.student.denoiser, SharedDenoiser)
        self.ema = cfg.target_ema if cfg.target_ema is not None else (0.0 if lora else 0.95)
        if self.ema > 0 and lora:
            raise ConfigError("a LoRA student is its own consistency target (LCM-LoRA): set consistency.target_ema "
                              "to 0 or leave it null")
        self.target = EMATarget(models.student, self.ema)

    def scalings(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """LCM's boundary scalings (c_skip, c_out), f(x, 0) = x."""
        s = self.cfg.timestep_scaling * t.to(torch.float64)
        sd2 = self.cfg.sigma_data ** 2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s / (s**2 + sd2).sqrt()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return c_skip.to(like.dtype).reshape(shape), c_out.to(like.dtype).reshape(shape)

    def consistency_fn(self, net, x_t: Tensor, t: Tensor, cond) -> Tensor:  # noqa: ANN001
        c_skip, c_out = self.scalings(t, x_t)
        return c_skip * x_t + c_out * net(x_t, t, cond).to(x_t.dtype)

    def solver_step(self, x_t: Tensor, t: Tensor, t_prev: Tensor, cond, w: Tensor | float) -> Tensor:  # noqa: ANN001
        """One DDIM step of the teacher guided at (per-sample) w from t to t_prev (the falsification test swaps the
        teacher here)."""
        return self.models.process.ddim_step(self.models.teacher.x0(x_t, t, cond, w), x_t, t, t_prev)

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        m, cfg = self.models, self.cfg
        x0, cond = batch.real, batch.real_cond
        n = len(x0)
        # 1. a grid point t_n+k and the point the solver reaches, t_n = t_n+k - k (clamped at 0)
        idx = draws.randint(0, len(self.grid), n, generator)
        t = torch.tensor(self.grid, device=x0.device)[idx.to(x0.device)]
        t_prev = (t - self.k).clamp_min(0)
        x_t = m.process.add_noise(x0, draws.randn(x0.shape, generator, x0), t)
        w = draw_cfg_scales(cfg.teacher_cfg, cfg.teacher_cfg_max, n, generator)
        cond_w = student_cond(m.student, cond, w)  # a w-conditioned student (and its target) read w itself
        # 2. the online student's consistency function at t_n+k
        pred = self.consistency_fn(m.student, x_t, t, cond_w)
        # 3. target: one guided teacher DDIM step, then the target network's consistency function at t_n
        with torch.no_grad():
            x_prev = self.solver_step(x_t, t, t_prev, cond, w)
            target = self.consistency_fn(self.target.net, x_prev, t_prev, cond_w)
        pred, target = pred.float(), target.float()
        if cfg.loss == "huber":
            loss = (torch.sqrt((pred - target) ** 2 + cfg.huber_c**2) - cfg.huber_c).mean()
        else:
            loss = F.mse_loss(pred, target)
        return loss, {"loss_cd": loss.item()}

    # ------------------------------------------------------------------------------------------- the EMA target
    def after_update(self, phase: str, step: int) -> None:
        self.target.update()

    def state_dict(self) -> dict[str, Tensor]:
        return self.target.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.target.load_state_dict(state)
