"""TDM: Trajectory Distribution Matching (Luo et al., "Learning Few-Step Diffusion Models by Trajectory Distribution
Matching", 2025, arXiv:2503.06674), as DMD2 with a step-aware critic.

A multi-step student is matched to the teacher step by step along its own trajectory, not as one pooled set of
outputs. With x = G(x_{t_k}, t_k) the output of student step k (input from the student's own rollout, as DMD2's
backward simulation):

- ``step_times: own`` (TDM's ``--use_separate``): the distribution-matching noise level of a step-k sample, and the
  critic's, lies in that step's own interval [t_{k+1}, t_k] (t_K = 0), so each interval's noisy marginal is matched
  by the step that covers it. TDM reaches x_t in two moves (a DDIM jump of (x, eps_hat) to t_{k+1}, then forward
  noise to t); with a re-noising sampler the student's next point is x noised with fresh noise, and noising x at t
  directly gives the same distribution, which is what is done here.
- ``critic_steps: conditioned``: the critic also reads k (`distill_diffusion.step_aware`). TDM's code trains one
  unconditioned fake score and its README suggests the step as a condition; on the mixture both are needed within
  the budget (measured: own intervals alone 4-step ED 0.0040 / std ratio 0.70, the conditioned critic alone 0.0028
  / 0.66 at its last step, both 0.0011 / 0.94; docs/BENCHMARKS.md).

Everything else is DMD2's (`methods/dmd2.py`: the normalised score difference, the GAN head, f-distill weighting,
decoupled guidance). Checked against Luo-Yihong/TDM ``train_tdm_demo.py`` (``generate_new``, the per-sample step
k, t_mid / ``--use_separate`` intervals, the CFG target split into guidance and matching parts, AdamW betas (0, 0.95),
the student's learning rate a fifth of the critic's, one critic update per student update). Deviations: the rollout
re-noises (DMD2 / LCM's sampler, so the export is the same LCMScheduler pipeline) where TDM's is a deterministic
DDIM with the student's own eps; one step k per batch, not per sample (``step_draw: sample`` gives each row its
own, stratified over the steps); the student loss is DMD's MSE surrogate, not
TDM's Huber (c = 1e-3, which makes the update nearly sign-like); the critic's loss is DMD2's denoising loss, without
TDM's min(SNR, 5) weight and importance weight for its two-move noising.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dmd2 import DMD2, DMD2Config


@dataclass
class TDMConfig(DMD2Config):
    critic_steps: str = "conditioned"
    step_times: str = "own"
    teacher_cfg: float = 4.5  # TDM's PixArt-alpha recipe (README); the SD configs set their own
    critic_updates: int = 1  # one critic update per student update
    adam_betas: tuple[float, float] = field(default=(0.0, 0.95))
    lr_student: float = 4e-6  # a fifth of the critic's (README: lr 2e-5)
    lr_critic: float = 2e-5


class TDM(DMD2):
    config_class = TDMConfig
