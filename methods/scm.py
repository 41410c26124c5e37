"""sCM: continuous-time consistency distillation (Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", ICLR 2025, arXiv:2410.11081), as SANA-Sprint distils flow teachers with it (Chen et al. 2025,
arXiv:2503.09641).

In TrigFlow time (`distill_diffusion.trigflow`: x = cos(t) x0 + sin(t) sigma_d eps, the teacher's own Gaussian path
rescaled, so a VP or a flow-matching teacher is used as it is) the student's consistency function is
f(x, t) = cos(t) x - sin(t) sigma_d F(x, t) = x0_student. Consistency in continuous time asks df/dt = 0 along the
teacher's probability-flow ODE, whose velocity is dx/dt = sigma_d F_teacher (guided at ``teacher_cfg``). With
F^- = sg(F), the sCM objective (Eq. 8, the stabilised tangent of Sec. 4):

    g  = -cos^2(t) (sigma_d F^- - dx/dt) - r cos(t) sin(t) (x + sigma_d dF^-/dt)        (= cos(t) df^-/dt at r = 1)
    g <- g / (||g|| + c)                                                                  tangent normalisation
    L  = E_t [ exp(-w(t)) / (sigma_d tan t) * mean (F - F^- - g)^2 + w(t) ]               adaptive weighting

where dF^-/dt is the total derivative along the ODE, one forward-mode Jacobian-vector product of the student with
tangents (cos t sin t dx/dt, cos t sin t) (``jvp: autograd``, `torch.func.jvp` with PyTorch's math attention kernel,
the fused CPU / flash kernels having no forward-AD rule), or a central finite difference along the same direction
(``jvp: finite_difference``, for kernels or sharded weights without forward mode); r rises from 0 to 1 over
``tangent_warmup`` updates; w(t) is a small learned log-variance of t (zero at start), trained with the student;
t ~ tan(t) = exp(N(p_mean, p_std^2)) / sigma_d, clamped to the teacher's range. At its first step the gradient of L
is the consistency-model gradient E[(1/tan t) (df/dtheta) . df^-/dt] (Song et al. 2023, Thm. 6), up to the weights.

The student samples as every consistency student here does: predict x0, re-noise to the next timestep (what
SCMScheduler computes, on the teacher's own grid: LCMScheduler / FlowMatchLCMScheduler export it unchanged).

Checked against NVlabs/FastGen ``fastgen/methods/consistency_model/sCM.py`` (TrigFlow preconditioning of an x0 net,
the tangent, warm-up, normalisation, the 1/sigma weight and logvar, the finite-difference fallback) and
NVlabs/Sana ``train_scripts/train_scm_ladd.py`` (sigma_d 0.5, ``logit_normal_trigflow`` times P_mean 0.2, P_std 1.6,
warm-up 4000, ``g / (||g|| + 0.1)`` with the norm over all of a sample, the loss weight 1 / (sigma_d tan t)).
Deviations: the student is the teacher's own network and convention (x0 through the teacher's process) with F
derived from it, instead of a network rewritten to output F (the same function at every (x, t)); the
finite-difference tangent moves along the teacher's ODE (what the JVP computes in distillation) where FastGen's moves
along the data path of the sampled (x0, eps); the norm is Sana's (over the whole sample; FastGen's default is the
RMS, ``g_norm_spatial_invariance``); the adaptive weight is a Fourier-feature MLP of t rather than a head on the
network's own time embedding (one for every architecture, exported nowhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill_diffusion import draws
from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs
from distill_diffusion.trigflow import TrigFlow

from .base import EMATarget, Method, MethodConfig, default_student_cfg, draw_cfg_scales, student_cond
from .derivative import MODES, derivative_along

JVPS = MODES


@dataclass
class TangentFields:
    """sCM's knobs, shared by `SCM` and rCM (`methods/rcm.py`)."""

    sigma_data: float = 0.5  # data scale of TrigFlow (SD / SANA latents: 0.5)
    p_mean: float = 0.2  # time proposal: log(sigma_d tan t) ~ N(p_mean, p_std^2) (SANA-Sprint 0.2, 1.6)
    p_std: float = 1.6
    tangent_warmup: int = 4000  # updates over which r rises from 0 to 1 (SANA-Sprint 4000, FastGen 10000)
    tangent_norm_c: float = 0.1  # g / (||g|| + c); 0: no normalisation
    adaptive_weight: bool = True  # learn w(t) (exp(-w) scales the loss, + w)
    time_weight: str = "inv_tan"  # inv_tan: 1 / (sigma_d tan t) (sCM, SANA-Sprint) | uniform (rCM)
    jvp: str = "autograd"  # autograd (torch.func.jvp) | finite_difference
    # the finite difference's step relative to t. FastGen's 1e-3 suits networks whose time input is TrigFlow t; a
    # teacher's network reads t in timesteps (0 .. 1000, sinusoids up to 1 rad per timestep), where 1e-3 is off by
    # 17% at t = 1.2 on the tiny SD 1.5 UNet and 1e-4 by 0.2% (tests/test_scm.py)
    fd_step: float = 1e-4
    target_ema: float = 0.0  # theta^- (F^-, dF^-/dt): 0 = the online student (sCM); > 0 an EMA of it (Song 2023)

    def check_tangent(self, name: str) -> None:
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise ConfigError(f"{name}.sigma_data and {name}.p_std must be > 0")
        if self.tangent_warmup < 0 or self.tangent_norm_c < 0:
            raise ConfigError(f"{name}.tangent_warmup and {name}.tangent_norm_c must be >= 0")
        if self.time_weight not in ("inv_tan", "uniform"):
            raise ConfigError(f"unknown {name}.time_weight {self.time_weight!r}; choose one of: inv_tan, uniform")
        if self.jvp not in JVPS:
            raise ConfigError(f"unknown {name}.jvp {self.jvp!r}; choose one of: {', '.join(JVPS)}")
        if not 0 <= self.target_ema < 1:
            raise ConfigError(f"{name}.target_ema must be in [0, 1), got {self.target_ema}")
        if not 0 < self.fd_step < 0.1:
            raise ConfigError(f"{name}.fd_step must be in (0, 0.1), got {self.fd_step}")


@dataclass
class SCMConfig(MethodConfig, TangentFields):
    lr_student: float = 1e-5
    weight_decay: float = 0.0
    teacher_cfg: float = 1.0  # the teacher's CFG scale in dx/dt (Imagen convention; SANA-Sprint draws 4 .. 5)
    teacher_cfg_max: float | None = None  # w ~ U[teacher_cfg, teacher_cfg_max] per sample, for a w-reading student
    student_cfg: float | None = None  # the scale a w-reading student samples at by default (null: teacher_cfg)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_tangent("scm")
        if self.teacher_cfg < 0 or (self.teacher_cfg_max is not None and self.teacher_cfg_max < self.teacher_cfg):
            raise ConfigError(f"scm.teacher_cfg must be >= 0 and teacher_cfg_max (if set) >= teacher_cfg, got "
                              f"{self.teacher_cfg} and {self.teacher_cfg_max}")


class LogVariance(nn.Module):
    """w(t): Fourier features of t, a linear layer to one number per sample; zero at start."""

    def __init__(self, features: int = 64):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features // 2) * 4)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        phase = t.float()[:, None] * self.freqs[None]
        return self.linear(torch.cat([phase.cos(), phase.sin()], -1)).squeeze(-1)


def attach_logvar(student: nn.Module, seed: int) -> LogVariance:
    """w(t) as ``student.scm_logvar``: it trains, checkpoints and resumes with the student; exports leave it out
    (they take the student's network alone)."""
    if not hasattr(student, "scm_logvar"):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            student.scm_logvar = LogVariance()
    return student.scm_logvar


class TangentTerm:
    """The sCM loss on a batch of real samples, for any method that holds ``models`` and a `TangentFields` config."""

    def __init__(self, cfg: TangentFields, models, seed: int):  # noqa: ANN001
        self.cfg = cfg
        self.models = models
        self.trig = TrigFlow(models.process, cfg.sigma_data)
        self.logvar = attach_logvar(models.student, seed) if cfg.adaptive_weight else None
        self.target = EMATarget(models.student, cfg.target_ema)  # theta^-: the online student, or its EMA

    def warmup(self, step: int) -> float:
        return 1.0 if self.cfg.tangent_warmup == 0 else min(1.0, step / self.cfg.tangent_warmup)

    def teacher_velocity(self, x: Tensor, t: Tensor, cond, w) -> Tensor:  # noqa: ANN001
        """dx/dt = sigma_d F_teacher(x, t), the teacher guided at ``w``."""
        teacher = self.models.teacher
        return self.cfg.sigma_data * self.trig.F(lambda xt, tau: teacher.x0(xt, tau, cond, w), x, t)

    def tangent_of_F(self, fn, x: Tensor, t: Tensor, dxdt: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        """(F(x, t), cos t sin t dF/dt) along the direction (dx/dt, 1), by forward-mode AD or a central difference."""
        F, dF = derivative_along(fn, x, t, dxdt, self.cfg.jvp, self.cfg.fd_step)  # noqa: N806
        cs = (t.cos() * t.sin()).reshape(-1, *([1] * (x.ndim - 1))).to(dF.dtype)
        return F, cs * dF

    def loss(self, x0: Tensor, cond, generator: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]:  # noqa: ANN001
        m, cfg, trig = self.models, self.cfg, self.trig
        n = len(x0)
        t = trig.sample_times(n, cfg.p_mean, cfg.p_std, generator).to(x0.device)
        x = trig.noised(x0, draws.randn(x0.shape, generator, x0), t)
        w = draw_cfg_scales(getattr(cfg, "teacher_cfg", 1.0), getattr(cfg, "teacher_cfg_max", None), n, generator)
        cond_w = student_cond(m.student, cond, w)

        def student_F(x_: Tensor, t_: Tensor, net: nn.Module = m.student) -> Tensor:  # noqa: N802
            return trig.F(lambda xt, tau: net(xt, tau, cond_w), x_, t_)

        with torch.no_grad():
            dxdt = self.teacher_velocity(x, t, cond, w)
            target = self.target.net
            F_minus, dF = self.tangent_of_F(lambda x_, t_: student_F(x_, t_, target), x, t, dxdt)  # noqa: N806
            shape = (-1,) + (1,) * (x.ndim - 1)
            r = self.warmup(step)
            g = tangent(F_minus, dF, dxdt, x, t, cfg.sigma_data, r)
            g_norm = g.flatten(1).norm(dim=1).reshape(shape)
            if cfg.tangent_norm_c > 0:
                g = g / (g_norm + cfg.tangent_norm_c)
        F_theta = student_F(x, t)  # noqa: N806
        per_sample = (F_theta.float() - F_minus.float() - g.float()).pow(2).flatten(1).mean(1)
        weight = 1 / (cfg.sigma_data * t.tan()).float() if cfg.time_weight == "inv_tan" else 1.0
        logvar = self.logvar(t) if self.logvar is not None else torch.zeros_like(per_sample)
        loss = (weight * torch.exp(-logvar) * per_sample + logvar).mean()
        return loss, {"loss_scm": loss.item(), "g_norm": g_norm.mean().item(), "tangent_warmup": r,
                      "logvar": logvar.mean().item()}


def tangent(F_minus: Tensor, dF: Tensor, dxdt: Tensor, x: Tensor, t: Tensor, sigma_data: float,  # noqa: N803
            r: float = 1.0) -> Tensor:
    """sCM's tangent g = -cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x + sigma_d dF), with ``dF`` = cos t sin t
    dF^-/dt (the JVP's output); at r = 1 it is cos(t) df^-/dt along the ODE."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    cos, sin = t.cos().reshape(shape).to(x.dtype), t.sin().reshape(shape).to(x.dtype)
    return -cos**2 * (sigma_data * F_minus - dxdt) - r * (cos * sin * x + sigma_data * dF)


class SCM(Method):
    config_class = SCMConfig

    @classmethod
    def needs(cls, cfg: SCMConfig) -> Needs:
        """Real data to noise; a student that may read its CFG scale."""
        return Needs(real_images="sCM distillation noises real data", student_reads_cfg=True,
                     student_cfg=default_student_cfg(cfg), copies_student=cfg.target_ema > 0)

    def __init__(self, cfg: SCMConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        self.term = TangentTerm(cfg, models, seed=models.seed + 3)

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        return self.term.loss(batch.real, batch.real_cond, generator, step)

    def after_update(self, phase: str, step: int) -> None:
        self.term.target.update()

    def state_dict(self) -> dict[str, Tensor]:
        return self.term.target.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.term.target.load_state_dict(state)
