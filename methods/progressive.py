"""Progressive distillation (Salimans & Ho, ICLR 2022, arXiv:2202.00512, Alg. 2).

Rounds halve the sampler's step count: in each round the student learns to do in one deterministic DDIM step what
its round's teacher does in two, then becomes the next round's teacher (the student carries on from its own
weights). Round r distils a teacher on N = start_steps / 2^r trailing DDIM steps into a student on N/2; the last
round's student samples on ``model.timesteps`` (which must be the trailing list of its length). Each step:

    x ~ data, i ~ U{0..N/2-1}, t = grid_N[2i], t' = grid_N[2i+1], t'' = grid_N[2i+2] (or clean), z_t = a_t x + s_t e
    z_t'  = DDIM(teacher_x0(z_t, t),   z_t,  t  -> t')                       two teacher steps
    z_t'' = DDIM(teacher_x0(z_t', t'), z_t', t' -> t'')
    x~    = (z_t'' - (s_t''/s_t) z_t) / (a_t'' - (s_t''/s_t) a_t)            the x0 whose one DDIM step lands on z_t''
                                                                              (x~ = z_t'' when t'' is the clean end)
    L     = w(t) || x_hat_student(z_t, t) - x~ ||^2,   w = max(SNR(t), 1) ("truncated SNR") or SNR(t) + 1 (v-MSE)

The first round's teacher is the pretrained model, guided at ``teacher_cfg`` (1 = none): the student then carries that
guidance, and later rounds (whose teacher is the previous student) use none.

Guided distillation (Meng et al., CVPR 2023, arXiv:2210.03142): with ``model.cfg_embedding_dim`` the student reads
its CFG scale w (the embedding LCM and diffusers' pipelines use) and a first stage of ``steps_per_round`` steps
teaches it the guided teacher at w ~ U[teacher_cfg, teacher_cfg_max] on every timestep,

    L = w(t) || x_hat_student(z_t, t, w) - x0_teacher^w(z_t, t) ||^2,     t ~ U{0 .. T-1}

after which the halving rounds run as above with the previous student, at the same per-sample w, as the teacher;
the exported student samples at any w in the range (``guidance_scale=w``). The learning rate anneals linearly to 0
within each round, as the reference does. The student samples with deterministic DDIM (its `Needs`)
and exports with a trailing ``DDIMScheduler``.

Checked against google-research ``diffusion_distillation/diffusion_distillation/dpm.py`` (``training_losses``: the
two half steps, the x-target solved from one DDIM step, ``snr_trunc`` weighting) and ``config/cifar_distill.py``
(lr 5e-5 annealed per round, no EMA, grad clip 1).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.errors import ConfigError
from distill_diffusion.lora import own_parameters
from distill_diffusion.process import CLEAN
from distill_diffusion.roles import Batch, Needs

from .base import (
    Method,
    MethodConfig,
    default_student_cfg,
    draw_cfg_scales,
    load_param_state,
    noised,
    param_state,
    student_cond,
)

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


@dataclass
class ProgressiveConfig(MethodConfig):
    lr_student: float = 5e-5
    weight_decay: float = 0.0
    start_steps: int | None = None  # the first round's teacher DDIM steps (e.g. 32); null: 2 x the student's (1 round)
    steps_per_round: int = 1000  # train steps per round; train.steps = rounds x steps_per_round (more: last round)
    weighting: str = "truncated_snr"  # truncated_snr: max(SNR, 1) on the x0 error | snr_plus_one: the v error
    teacher_cfg: float = 1.0  # CFG scale of the first round's teacher (Imagen convention, 1 = none); a range's low end
    teacher_cfg_max: float | None = None  # w ~ U[teacher_cfg, teacher_cfg_max] for a student that reads w (Meng)
    student_cfg: float | None = None  # the scale a student that reads it samples at by default (null: teacher_cfg)
    anneal: bool = True  # learning rate linearly to 0 within each round

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start_steps is not None and self.start_steps < 2:
            raise ConfigError(f"progressive.start_steps must be >= 2 (or null), got {self.start_steps}")
        if self.steps_per_round < 1:
            raise ConfigError(f"progressive.steps_per_round must be >= 1, got {self.steps_per_round}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown progressive.weighting {self.weighting!r}; choose one of: "
                              f"{', '.join(WEIGHTINGS)}")
        if self.teacher_cfg < 0 or (self.teacher_cfg_max is not None and self.teacher_cfg_max < self.teacher_cfg):
            raise ConfigError(f"progressive.teacher_cfg must be >= 0 (1 = no guidance) and teacher_cfg_max (if set) "
                              f">= teacher_cfg, got {self.teacher_cfg} and {self.teacher_cfg_max}")


class Progressive(Method):
    config_class = ProgressiveConfig

    @classmethod
    def needs(cls, cfg: ProgressiveConfig) -> Needs:
        """Real data to noise; a DDIM student; a copy of it (each round's teacher); it may read its CFG scale."""
        return Needs(student_sampler="ddim", real_images="progressive distillation noises real data",
                     copies_student=True, student_reads_cfg=True, student_cfg=default_student_cfg(cfg))

    def __init__(self, cfg: ProgressiveConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        process, timesteps = models.process, list(models.student.timesteps)
        k = len(timesteps)
        if timesteps != process.trailing_timesteps(k):
            raise ConfigError(f"progressive students sample on the trailing DDIM grid: model.timesteps must be "
                              f"{process.trailing_timesteps(k)} for {k} steps, got {timesteps}")
        start = cfg.start_steps or 2 * k
        rounds = math.log2(start / k)
        if start % k or rounds != int(rounds) or rounds < 1:
            raise ConfigError(f"progressive.start_steps ({start}) must be the student's step count ({k}) times a "
                              "power of 2 (e.g. 8 -> 4 is one round, 32 -> 4 three)")
        if cfg.teacher_cfg_max is not None and not models.student.reads_cfg:
            raise ConfigError("progressive.teacher_cfg_max (a range of CFG scales) needs a student that reads its "
                              "scale: set model.cfg_embedding_dim (e.g. 256)")
        self.start, self.rounds = start, int(rounds)
        self.stage = 1 if models.student.reads_cfg else 0  # the guided stage before the halving rounds
        self.round = 0
        self._names = list(own_parameters(models.student))
        self.round_teacher: torch.nn.Module | None = None  # rounds >= 1: the previous round's student, frozen


    def round_of(self, step: int) -> int:
        """Round r of the run: r < `stage` is the guided stage, later rounds halve the teacher's steps."""
        return min(step // self.cfg.steps_per_round, self.stage + self.rounds - 1)

    def teacher_steps(self, r: int) -> int:
        return self.start // 2 ** (r - self.stage)

    def lr_at(self, role: str, step: int) -> float:
        lr = self.lr(role)
        if not self.cfg.anneal or step // self.cfg.steps_per_round >= self.stage + self.rounds:
            return lr
        return lr * (1 - (step % self.cfg.steps_per_round) / self.cfg.steps_per_round)

    def _start_round(self, r: int) -> None:
        """The student as it stands becomes the frozen teacher of round r (r >= 1)."""
        self.round_teacher = copy.deepcopy(self.models.student).requires_grad_(False).eval()
        self.round = r

    def teacher_x0(self, x_t: Tensor, t: Tensor, cond) -> Tensor:  # noqa: ANN001
        """The round's teacher: the guided pretrained model in round 0, else the previous round's student, which
        reads the per-sample scale in ``cond.cfg_scale`` when it reads one."""
        if self.round == 0:
            return self.models.teacher.x0(x_t, t, cond, self.cfg.teacher_cfg)
        return self.round_teacher(x_t, t, cond)

    def target(self, z_t: Tensor, t: Tensor, t_mid: Tensor, t_end: Tensor, cond) -> Tensor:  # noqa: ANN001
        """The x0 whose single DDIM step from (z_t, t) lands where two teacher steps land at t_end (`CLEAN` where
        the second step ends at the data)."""
        process = self.models.process
        z_mid = process.ddim_step(self.teacher_x0(z_t, t, cond).to(z_t.dtype), z_t, t, t_mid)
        z_end = process.ddim_step(self.teacher_x0(z_mid, t_mid, cond).to(z_t.dtype), z_mid, t_mid, t_end)
        a_t, s_t = process.alpha_sigma(t, z_t)
        a_e, s_e = process.alpha_sigma(t_end, z_t)
        ratio = s_e / s_t
        return (z_end - ratio * z_t) / (a_e - ratio * a_t)

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        m = self.models
        r = self.round_of(step)
        if r != self.round or (r > 0 and self.round_teacher is None):
            self._start_round(r)
        x0, cond = batch.real, batch.real_cond
        if r < self.stage:
            return self.guided_stage_loss(x0, cond, generator)
        if self.stage:  # a w-conditioned student and its round teacher read per-sample scales
            w = draw_cfg_scales(self.cfg.teacher_cfg, self.cfg.teacher_cfg_max, len(x0), generator)
            cond = student_cond(m.student, cond, w)
        n_student = self.teacher_steps(r) // 2
        grid = m.process.trailing_timesteps(self.teacher_steps(r)) + [CLEAN]
        grid = torch.tensor(grid, device=x0.device)
        i = draws.randint(0, n_student, len(x0), generator).to(x0.device)
        t, t_mid, t_end = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        z_t = m.process.add_noise(x0, draws.randn(x0.shape, generator, x0), t)
        with torch.no_grad():
            x_target = self.target(z_t, t, t_mid, t_end, cond)
        loss = self.regression(m.student(z_t, t, cond), x_target, z_t, t)
        return loss, {"loss_pd": loss.item(), "round": float(r)}

    def guided_stage_loss(self, x0: Tensor, cond, generator: torch.Generator  # noqa: ANN001
                          ) -> tuple[Tensor, dict[str, float]]:
        """Meng et al.'s first stage: the w-conditioned student matches the teacher guided at w, on every t."""
        m = self.models
        w = draw_cfg_scales(self.cfg.teacher_cfg, self.cfg.teacher_cfg_max, len(x0), generator)
        z_t, t, _ = noised(m.process, x0, 0.0, 1.0, generator)
        with torch.no_grad():
            x_target = m.teacher.x0(z_t, t, cond, w)
        loss = self.regression(m.student(z_t, t, student_cond(m.student, cond, w)), x_target, z_t, t)
        return loss, {"loss_guided": loss.item(), "round": 0.0}

    def regression(self, x_hat: Tensor, x_target: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """The x0 regression with the configured weighting (truncated SNR, or SNR + 1: the v error)."""
        snr = self.models.process.snr(t)
        weight = snr.clamp_min(1.0) if self.cfg.weighting == "truncated_snr" else snr + 1
        per_sample = (x_hat.float() - x_target.float()).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Tensor]:
        state = {"round": torch.tensor([self.round])}
        if self.round_teacher is not None:
            state.update(param_state(self.round_teacher, self._names, "round_teacher."))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.round = int(state["round"][0])
        self.round_teacher = None
        if self.round > 0:
            self.round_teacher = copy.deepcopy(self.models.student).requires_grad_(False).eval()
            load_param_state(self.round_teacher, self._names, "round_teacher.", state)
