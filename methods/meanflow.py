"""MeanFlow: a flow-map student that samples in any number of steps from one set of weights (Geng et al., "Mean Flows
for One-step Generative Modeling", 2025, arXiv:2505.13447), distilled from the teacher's velocity.

On the straight path x_s = (1 - s) x0 + s eps (`distill_diffusion.flowtime`: any teacher's Gaussian path, rescaled)
the average velocity between times r < s along the teacher's probability-flow ODE,
u(x_s, r, s) = (x_s - x_r) / (s - r), obeys the MeanFlow identity (differentiate (s - r) u = the integral of v
from r to s in s, at fixed r):

    u(x_s, r, s) = v(x_s, s) - (s - r) d/ds u(x_s, r, s),      d/ds u = v . grad_x u + du/ds

with v the teacher's velocity (guided at ``teacher_cfg``) and d/ds u one forward-mode JVP of the student along the
tangent (v, 0, 1) in (x, r, s) (`methods.derivative`). The loss regresses the student's u on the stopped target:

    L = E [ w * || u_theta(x_s, r, s) - sg(v - (s - r) d/ds u_theta) ||^2 ],    w = sg(1 / (||.||^2 + c)^p)

(MeanFlow's adaptive weight, p = 1, c = 1e-3). (s, r): two logit-normal draws (mean -0.4, std 1.0), s the larger;
a ``start_ratio`` share gets s at the student's first timestep (an addition: where every sampler starts), a
``flow_matching_ratio`` share r = s (the instantaneous velocity, what the teacher already gives: MeanFlow's 75%)
and a ``consistency_ratio`` share r = 0 (straight to data, FastGen's bucket). The student is the teacher's network
with a zero-initialised embedding of the interval t - end_timestep (`distill_diffusion.two_time`), so it starts as
the teacher: u(x, r, s) = v(x, s) for every r, a one-step Euler sampler. It samples with `sampling.flow_map`: at each
step it predicts x0 knowing where the step ends and moves there by DDIM, which is x_r = x_s - (s - r) u.

Checked against the paper (Alg. 1, Eq. 6-11, Table 1) and NVlabs/FastGen ``fastgen/methods/consistency_model/
mean_flow.py`` (``FlowMapLossMixin``: the teacher's velocity as target source ``use_cd``, tangents (v, 1, 0) on
(x, t, r), the flow-matching / consistency buckets, ``poly`` adaptive weight on the per-sample sum, optional tangent
warm-up, the finite-difference fallback). Deviations: the network keeps the teacher's convention (an x0 prediction
in the teacher's own coordinates, u derived from it) instead of outputting u; the second time is the interval in the
teacher's timesteps through an embedding added to the network's own time embedding (a stock class embedding on a
UNet); the finite-difference step is relative to s (sCM's reason: the networks read timesteps through sinusoids).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.errors import ConfigError
from distill_diffusion.flowtime import FlowTime
from distill_diffusion.roles import Batch, Needs

from .base import Method, MethodConfig, default_student_cfg, draw_cfg_scales, student_cond
from .derivative import MODES, derivative_along


@dataclass
class MeanFlowConfig(MethodConfig):
    lr_student: float = 1e-5
    weight_decay: float = 0.0
    teacher_cfg: float = 1.0  # the teacher's CFG scale in v (Imagen convention)
    teacher_cfg_max: float | None = None  # w ~ U[teacher_cfg, teacher_cfg_max] per sample, for a w-reading student
    student_cfg: float | None = None  # the scale a w-reading student samples at by default (null: teacher_cfg)
    p_mean: float = -0.4  # logit-normal times (MeanFlow Table 1d: -0.4, 1.0)
    p_std: float = 1.0
    flow_matching_ratio: float = 0.75  # share with r = s (MeanFlow Table 1a: 25% r != s is best from scratch)
    consistency_ratio: float = 0.0  # share with r = 0 (FastGen's consistency bucket)
    # share with s at the student's first timestep (pure noise on a flow path), where every sampler starts: the
    # logit-normal proposal almost never draws it, so without this bucket s = s_max is extrapolated (not MeanFlow's)
    start_ratio: float = 0.0
    adaptive_p: float = 1.0  # w = 1 / (||err||^2 + c)^p; 0: the plain mean squared error
    adaptive_c: float = 1e-3
    tangent_warmup: int = 0  # updates over which the (s - r) du/ds term rises from 0 to 1 (FastGen's option)
    jvp: str = "autograd"  # autograd (torch.func.jvp) | finite_difference
    fd_step: float = 1e-4  # the finite difference's step relative to s

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_cfg < 0 or (self.teacher_cfg_max is not None and self.teacher_cfg_max < self.teacher_cfg):
            raise ConfigError(f"meanflow.teacher_cfg must be >= 0 and teacher_cfg_max (if set) >= teacher_cfg, got "
                              f"{self.teacher_cfg} and {self.teacher_cfg_max}")
        if self.p_std <= 0:
            raise ConfigError(f"meanflow.p_std must be > 0, got {self.p_std}")
        if not (0 <= self.flow_matching_ratio and 0 <= self.consistency_ratio
                and self.flow_matching_ratio + self.consistency_ratio <= 1):
            raise ConfigError(f"meanflow.flow_matching_ratio and consistency_ratio must be >= 0 with a sum <= 1, got "
                              f"{self.flow_matching_ratio} and {self.consistency_ratio}")
        if not 0 <= self.start_ratio <= 1:
            raise ConfigError(f"meanflow.start_ratio must be in [0, 1], got {self.start_ratio}")
        if self.adaptive_p < 0 or self.adaptive_c <= 0 or self.tangent_warmup < 0:
            raise ConfigError("meanflow.adaptive_p and tangent_warmup must be >= 0 and adaptive_c > 0")
        if self.jvp not in MODES:
            raise ConfigError(f"unknown meanflow.jvp {self.jvp!r}; choose one of: {', '.join(MODES)}")
        if not 0 < self.fd_step < 0.1:
            raise ConfigError(f"meanflow.fd_step must be in (0, 0.1), got {self.fd_step}")


class MeanFlow(Method):
    config_class = MeanFlowConfig

    @classmethod
    def needs(cls, cfg: MeanFlowConfig) -> Needs:
        """Real data to noise; a flow-map student (a second time input), which may read its CFG scale."""
        return Needs(real_images="MeanFlow distillation noises real data", student_sampler="flowmap",
                     student_reads_cfg=True, student_cfg=default_student_cfg(cfg))

    def __init__(self, cfg: MeanFlowConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        self.flow = FlowTime(models.process)

    def times(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(s, r), s >= r, float64: two logit-normal draws, then the r = s and r = 0 buckets."""
        cfg = self.cfg
        a = self.flow.sample_times(n, cfg.p_mean, cfg.p_std, generator)
        b = self.flow.sample_times(n, cfg.p_mean, cfg.p_std, generator)
        s, r = torch.maximum(a, b), torch.minimum(a, b)
        if cfg.start_ratio > 0:  # the sampler's start, then r below it as drawn
            start = draws.rand(n, generator).double() < cfg.start_ratio
            s = torch.where(start, torch.full_like(s, self.flow.s_max), s)
        u = draws.rand(n, generator).double()
        r = torch.where(u >= 1 - cfg.flow_matching_ratio, s, r)
        return s, torch.where(u < cfg.consistency_ratio, torch.zeros_like(r), r)

    def warmup(self, step: int) -> float:
        return 1.0 if self.cfg.tangent_warmup == 0 else min(1.0, step / self.cfg.tangent_warmup)

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        m, cfg, flow = self.models, self.cfg, self.flow
        x0 = batch.real
        n = len(x0)
        s, r = self.times(n, generator)
        s, r = s.to(x0.device), r.to(x0.device)
        x = flow.noised(x0, draws.randn(x0.shape, generator, x0), s)
        w = draw_cfg_scales(cfg.teacher_cfg, cfg.teacher_cfg_max, n, generator)
        cond = replace(student_cond(m.student, batch.real_cond, w), end_timestep=flow.timestep(r).to(x0.dtype))

        def u_fn(x_: Tensor, s_: Tensor) -> Tensor:
            return flow.velocity(lambda xt, tau: m.student(xt, tau, cond), x_, s_)

        with torch.no_grad():
            v = flow.velocity(lambda xt, tau: m.teacher.x0(xt, tau, batch.real_cond, w), x, s)
            _, du = derivative_along(u_fn, x, s, v, cfg.jvp, cfg.fd_step)
            target = v - self.warmup(step) * _bcast(s - r, x).to(x.dtype) * du
        err = (u_fn(x, s).float() - target.float()).pow(2).flatten(1)
        err = err.sum(1) if cfg.adaptive_p > 0 else err.mean(1)
        weight = 1 / (err.detach() + cfg.adaptive_c).pow(cfg.adaptive_p)
        loss = (weight * err).mean()
        return loss, {"loss_meanflow": loss.item(), "err": err.mean().item(), "du_norm": du.flatten(1).norm(dim=1)
                      .mean().item(), "interval": (s - r).mean().item()}


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
