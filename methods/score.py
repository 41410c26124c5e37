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

from distill_diffusion import draws, step_aware
from distill_diffusion.denoiser import Cond, cfg_x0
from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs
from distill_diffusion.sampling import ddim

from . import gan
from .base import AlternatingMethod, MethodConfig, noised, noised_groups

CRITIC_TARGETS = ("native", "epsilon", "v_prediction", "sample", "flow")
STEP_TIMES = ("full", "own", "above", "own_last_full")


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
    # multi-step students (issue 27): what the critic knows of the step that produced its sample. shared: nothing
    # (DMD2: one critic fits the mixture of every step's outputs); conditioned: it reads the step (a zero-initialised
    # step embedding, `distill_diffusion.step_aware`)
    critic_steps: str = "shared"
    # the noise levels a step-k sample is drawn at, in the student's and the critic's losses: full (the ranges
    # above, DMD2) | own (only inside that step's own interval [t_{k+1}, t_k], t_K = 0, within those ranges: TDM's
    # --use_separate, which makes even a shared critic step-aware through time) | above (from that step's end up,
    # [t_{k+1}, t_max]; an ablation: it misses the mixture's known answer, docs/methods.md) | own_last_full (own,
    # but the last step, whose output is the sample, over the full range)
    step_times: str = "full"
    # which student step each sample of a batch comes from: batch (one step k drawn for the whole batch, DMD2's
    # backward simulation) | sample (the batch split evenly over the steps, each row rolled out to its own: every
    # update sees every step; TDM's per-sample ind_t, stratified)
    step_draw: str = "batch"
    # f-distill (Xu et al. 2025, arXiv:2502.15681): the distribution-matching gradient of each sample weighted by
    # h(r), r = p_data / q_student at its noised sample estimated by the GAN head (r = exp(logit)): reverse_kl (h = 1,
    # DMD) | forward_kl (r) | js (r / (1 + r)) | hellinger (sqrt r, squared Hellinger) | neyman (1 / r, Neyman
    # chi^2: more mode-seeking than reverse KL; FastGen's `neyman`). Needs the GAN head trained on
    # real images (gan_critic_weight > 0); until gan_start the weight is 1
    # decoupled: DMD's two terms re-noised apart (Decoupled DMD, Liu et al. 2025): the distribution-matching term at
    # the ranges above, the CFG-augmentation term (w - 1)(x0_c - x0_u) at its own tau ~ U[t_min, t_k], never noisier
    # than the student step's input (`DMD2.guidance_term`); shared: one noised sample for both (DMD2). dmd2 / rcm only
    cfg_times: str = "shared"
    f_divergence: str = "reverse_kl"
    # trajectory regression (issue 27; DMD's regression loss, Yin et al. 2024, moved onto the student's own
    # trajectory): a step-k sample x (k >= ode_from_step) is also pulled toward the guided teacher's deterministic
    # DDIM solution y from the same input x_{t_k} in ode_steps steps: ode_weight * 0.5 mean (x - y)^2 / sg(mean
    # |x - y|) (DMD's normaliser). It keeps what the step's input already carries, which distribution matching
    # inside a late step's low-noise interval re-decides (docs/methods.md, TDM). 0 = off
    ode_weight: float = 0.0
    ode_steps: int = 4
    ode_from_step: int = 1
    f_ratio_clip: tuple[float, float] = (0.1, 20.0)  # r clipped to this range (NVlabs/FastGen's ratio_lower / upper)
    f_ratio_bins: int = 10  # r divided by its batch mean within this many bins of t (FastGen's ratio_normalization)

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
        if self.critic_steps not in ("shared", "conditioned"):
            raise ConfigError(f"unknown {name}.critic_steps {self.critic_steps!r}; choose one of: shared, conditioned")
        if self.step_times not in STEP_TIMES:
            raise ConfigError(f"unknown {name}.step_times {self.step_times!r}; choose one of: {', '.join(STEP_TIMES)}")
        if self.step_draw not in ("batch", "sample"):
            raise ConfigError(f"unknown {name}.step_draw {self.step_draw!r}; choose one of: batch, sample")
        if self.cfg_times not in ("shared", "decoupled"):
            raise ConfigError(f"unknown {name}.cfg_times {self.cfg_times!r}; choose one of: shared, decoupled")
        if self.cfg_times == "decoupled" and name in ("sid", "vsd"):
            raise ConfigError(f"{name}.cfg_times decoupled splits DMD's gradient into its guidance and matching "
                              f"terms; {name}'s loss is not that sum: use dmd2 (or rcm)")
        if self.f_divergence not in F_WEIGHTS:
            raise ConfigError(f"unknown {name}.f_divergence {self.f_divergence!r}; choose one of: "
                              f"{', '.join(F_WEIGHTS)}")
        if self.f_divergence != "reverse_kl" and self.gan_critic_weight <= 0:
            raise ConfigError(f"{name}.f_divergence {self.f_divergence} weights by the density ratio the GAN head "
                              f"estimates: set {name}.gan_critic_weight > 0 (the head then trains on real images)")
        if self.ode_weight > 0 and name == "sid":
            raise ConfigError("sid.ode_weight: SiD's loss is a per-sample sum in its own units, where a mean squared "
                              "distance has no matching scale; the trajectory regression is for dmd2 / tdm / vsd")
        if self.ode_weight < 0 or self.ode_steps < 1 or self.ode_from_step < 0:
            raise ConfigError(f"{name} needs ode_weight >= 0, ode_steps >= 1 and ode_from_step >= 0, got "
                              f"{self.ode_weight}, {self.ode_steps}, {self.ode_from_step}")
        lo, hi = self.f_ratio_clip
        if not 0 < lo <= 1 <= hi or self.f_ratio_bins < 0:
            raise ConfigError(f"{name}.f_ratio_clip must be (lo, hi) with 0 < lo <= 1 <= hi and f_ratio_bins >= 0 "
                              f"(0: no binning), got {list(self.f_ratio_clip)}, {self.f_ratio_bins}")


# h(r) = f''(r) r^2 up to a constant for each f (f-distill Table 1; NVlabs/FastGen
# ``fastgen/methods/distribution_matching/f_distill.py``): the weight of the reverse-KL (DMD) gradient
F_WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "hellinger": lambda r: r.sqrt(),
    "neyman": lambda r: 1 / r,
}


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

    f_logs: dict[str, float] = {}  # what the last `f_weight` did, for the step's logs (replaced, never mutated)

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
        steps = models.student.timesteps
        if cfg.ode_weight > 0 and not (cfg.backward_simulation and cfg.ode_from_step < len(steps)):
            name = type(cfg).__name__.removesuffix("Config").lower()
            raise ConfigError(f"{name}.ode_weight regresses student steps ode_from_step.. on their own rollout: it "
                              f"needs backward_simulation and ode_from_step ({cfg.ode_from_step}) below the "
                              f"student's {len(steps)} step(s)")
        aware = cfg.critic_steps != "shared" or cfg.step_times != "full" or cfg.step_draw != "batch"
        if aware and len(steps) > 1:
            name = type(cfg).__name__.removesuffix("Config").lower()
            if not cfg.backward_simulation:
                raise ConfigError(f"{name}.critic_steps / step_times / step_draw tell the critic which student step "
                                  "made its sample; without backward_simulation every sample comes from step 0")
            if cfg.critic_steps == "conditioned":
                step_aware.attach(models.critic, len(steps))
            for k in range(len(steps)):  # every step's interval must meet both ranges
                for critic in (False, True):
                    lo, hi = self.step_range(k, critic)
                    if lo > hi:
                        raise ConfigError(f"{name}.step_times {cfg.step_times}: student step {k} (t = {steps[k]}) "
                                          f"leaves no timesteps inside its {'critic_' if critic else ''}t_min .. "
                                          "t_max range")

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

    def draw_step(self, batch: Batch, generator: torch.Generator) -> int | Tensor:
        """With ``step_draw: sample`` the rows of the batch split evenly over the student's steps, in order (row i of
        n from step i K // n), each rolled out to its own step: every update sees every step; else one step for the
        batch (`AlternatingMethod.draw_step`)."""
        K, n = len(self.models.student.timesteps), len(batch.noise)
        if self.cfg.step_draw != "sample" or K == 1:
            return super().draw_step(batch, generator)
        return torch.arange(n, device=batch.noise.device) * K // n

    def score_sample(self, batch: Batch, generator: torch.Generator, grad: bool
                     ) -> tuple[Tensor, Cond, int | Tensor]:
        """(x = G(input) at a random student step k, the conditioning the critic reads for it, k): with
        ``critic_steps: conditioned`` that conditioning carries k (`step_aware.with_student_step`)."""
        x, k = self.sample_step(batch, generator, grad)
        cond = batch.cond
        if self.cfg.critic_steps == "conditioned" and len(self.models.student.timesteps) > 1:
            cond = step_aware.with_student_step(cond, k, len(x))
        return x, cond, k

    def trajectory_term(self, loss: Tensor, logs: dict[str, float], x: Tensor, k: int | Tensor, batch: Batch
                        ) -> Tensor:
        """``loss`` plus ``ode_weight`` times the batch mean of 0.5 mean (x - y)^2 / sg(mean |x - y|) per sample (so
        the gradient is (x - y) / mean |x - y| per element, DMD's normaliser), x the student's sample (with gradient)
        and y the guided teacher's DDIM solution from the same input (the rollout's ``student_input``) to the clean
        end in ``ode_steps`` uniform steps, on rows of step k >= ``ode_from_step`` (the others add 0). DMD (Yin et al.
        2024, arXiv:2311.18828) regresses a 1-step student onto the teacher's ODE output from pure noise, paired
        offline; here each late step is paired online with the ODE from its own input, a few teacher steps from a
        noise level below T."""
        cfg = self.cfg
        if cfg.ode_weight == 0:
            return loss
        x_in, t_in = self.student_input
        k = k.to(x.device) if isinstance(k, Tensor) else torch.full((len(x),), int(k), device=x.device)
        rows = k >= cfg.ode_from_step
        if not rows.any():
            logs["loss_ode"] = 0.0
            return loss
        with torch.no_grad():
            target = torch.zeros_like(x_in)
            for t0 in t_in[rows].unique():  # one DDIM grid per starting level
                part = rows & (t_in == t0)
                start = float(t0)
                grid = [start * (1 - j / cfg.ode_steps) for j in range(cfg.ode_steps)]
                grid = [round(t) for t in grid] if start == int(start) else grid
                cond = batch.cond[part]
                target[part] = ddim(lambda z, t, c=cond: self.models.teacher.x0(z, t, c, cfg.teacher_cfg),
                                    x_in[part], grid, self.models.process).to(target.dtype)
        diff = x.float() - target.float()
        with torch.no_grad():  # DMD's per-sample normaliser (Eq. 8): a step whose output is already near its
            norm = per_sample_mean_abs(diff)  # target is pulled as hard as a far one (TDM / iCT's pseudo-Huber)
        per_sample = 0.5 * (diff.pow(2) / norm).flatten(1).mean(1)
        loss_ode = (per_sample * rows).sum() / len(x)
        logs["loss_ode"] = loss_ode.item()
        logs["ode_distance"] = (diff.detach().abs().flatten(1).mean(1)[rows]).mean().item()
        return loss + cfg.ode_weight * loss_ode

    def step_range(self, k: int, critic: bool = False) -> tuple[float, float]:
        """The fractions of T a step-k sample is noised at: the student loss's [t_min, t_max] (the critic's
        [critic_t_min, critic_t_max] with ``critic``), narrowed with ``step_times: own`` to the step's own interval
        [t_{k+1}, t_k] (t_K = 0; TDM ``train_tdm_demo.py``, ``--use_separate``), with ``above`` to [t_{k+1}, t_max]
        (a step's output is right when its noisy marginal at t_{k+1}, where the next step reads it, is the teacher's,
        and then so is every noisier one; the last step's range is the full one). On a shifted flow path the interval
        is mapped back through the shift, so the drawn timesteps themselves fall inside it."""
        cfg = self.cfg
        lo, hi = (cfg.critic_t_min, cfg.critic_t_max) if critic else (cfg.t_min, cfg.t_max)
        steps = self.models.student.timesteps
        last = k == len(steps) - 1
        if cfg.step_times == "full" or len(steps) == 1 or (last and cfg.step_times == "own_last_full"):
            return lo, hi
        T, s = self.models.process.num_train_timesteps, cfg.t_shift
        end = [float(steps[k]) / T, float(steps[k + 1]) / T if k + 1 < len(steps) else 0.0]
        top, bottom = (f / (s - (s - 1) * f) for f in end)  # the inverse of s u / (1 + (s - 1) u)
        return max(lo, bottom), hi if cfg.step_times == "above" else min(hi, top)

    def noised_at(self, x: Tensor, k: int | Tensor, generator: torch.Generator, critic: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, eps) for samples of student step ``k`` (one for all, or (B,) one per row), t over `step_range`."""
        return noised_groups(self.models.process, x, k, lambda j: self.step_range(j, critic), generator,
                             self.cfg.t_shift)

    def f_weight(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor | None:
        """f-distill's per-sample weight h(r) / mean h(r) at the noised student samples ``x_t`` (B,), or None (h = 1:
        reverse KL, or the GAN head not yet on). r = exp(logit) of the head (logit clamped to [-10, 10]), clipped to
        ``f_ratio_clip``, divided by its batch mean within each of ``f_ratio_bins`` bins of t (FastGen's
        ``ratio_normalization`` with its EMA rate 0: the batch's own means); no gradient. Its range and the logit's
        spread are kept in ``f_logs`` for the step's logs."""
        cfg = self.cfg
        self.f_logs = {}
        if cfg.f_divergence == "reverse_kl" or not self._gan_now:
            return None
        with torch.no_grad():
            logit = gan.logits(self.models.critic, x_t, t, cond).float().clamp(-10, 10)
            r = logit.exp().clamp(*cfg.f_ratio_clip)
            if cfg.f_ratio_bins > 1:
                frac = t.float() / self.models.process.num_train_timesteps
                width = max(cfg.t_max - cfg.t_min, 1e-8)  # the bins split the student loss's range, as FastGen's
                bins = ((frac - cfg.t_min) / width * cfg.f_ratio_bins).long().clamp(0, cfg.f_ratio_bins - 1)
                total = torch.zeros(cfg.f_ratio_bins, device=r.device).index_add_(0, bins, r)
                count = torch.zeros(cfg.f_ratio_bins, device=r.device).index_add_(0, bins, torch.ones_like(r))
                r = r / (total / count.clamp_min(1))[bins]
            h = F_WEIGHTS[cfg.f_divergence](r)
            h = h / h.mean().clamp_min(1e-6)
        # what the weighting does (FastGen logs h's range too): a head that cannot tell the student from the data has
        # a logit spread near 0 and h near 1, i.e. reverse KL whatever f_divergence says (docs/methods.md)
        self.f_logs = {"f_h_min": h.min().item(), "f_h_max": h.max().item(), "f_logit_std": logit.std().item()}
        return h

    def real_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.models.teacher.x0(x_t, t, cond, self.cfg.teacher_cfg)

    def fake_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return cfg_x0(self.models.critic, x_t, t, cond, self.cfg.critic_cfg)

    def critic_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        x, cond, k = self.score_sample(batch, generator, grad=False)
        loss, logs = self.critic_denoising_loss(x.detach(), cond, generator, k)
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

    def critic_denoising_loss(self, x: Tensor, cond: Cond, generator: torch.Generator, k: int | Tensor = 0
                              ) -> tuple[Tensor, dict[str, float]]:
        """The critic's denoising loss on the (detached) student samples ``x`` of step ``k``, t uniform over the
        fractions [critic_t_min, critic_t_max] of T (all of [0, T) by default; `step_range`)."""
        m, cfg = self.models, self.cfg
        x_t, t, _ = self.noised_at(x, k, generator, critic=True)
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
