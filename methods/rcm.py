"""rCM: sCM regularised by distribution matching (Zheng et al., "Large Scale Diffusion Distillation via Score-
Regularized Continuous-Time Consistency", 2025, arXiv:2510.08431; NVlabs/rcm).

The student's loss is sCM's (`methods/scm.py`, on noised real data) plus ``dmd_weight`` times DMD2's distribution-
matching loss on the student's own samples (`methods/dmd2.py`, with its fake critic, update ratio and backward
simulation): sCM pins every noise level to the teacher's ODE, DMD's reverse-KL term sharpens what the few steps
produce, which sCM alone leaves blurred (rCM Sec. 3-4). The critic is DMD2's, trained on detached student samples.
``dmd_start`` student updates run sCM alone first (rCM: until the tangent warm-up ends).

Checked against NVlabs/rcm ``rcm/models/t2v_model_distill_rcm.py``: the two terms' scales (sCM summed x 100, DMD
summed x 1, i.e. DMD at 0.01 of sCM per element), one student update per 4 critic updates after warm-up, DMD added
only after the warm-up, the DMD2 normaliser, the teacher guided in x0 for both terms. Deviations: sCM's tangent
warm-up and normalisation are SANA-Sprint's (rCM rewrites the warm-up as -cos t sqrt(1 - r^2 sin^2 t)(F^- - F_T) -
(r cos t sin t x + JVP); both reach the same tangent at r = 1); the critic is trained in the teacher's own
parameterisation (DMD2's denoising loss), where rCM's is an F-space (velocity) loss; the two are the same
minimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill_diffusion.errors import ConfigError
from distill_diffusion.roles import Batch, Needs

from .dmd2 import DMD2, DMD2Config
from .scm import TangentFields, TangentTerm


@dataclass
class RCMConfig(DMD2Config, TangentFields):
    teacher_cfg: float = 1.0  # one guided teacher for both terms (rCM: 5 on Wan)
    critic_updates: int = 4  # rCM: student_update_freq 5
    dmd_weight: float = 0.01  # the DMD term's weight beside sCM's (rCM: 1 against 100)
    dmd_start: int = 0  # student updates of sCM alone before the DMD term joins
    scm_weight: float = 1.0  # sCM's weight (0: DMD2 alone, with the critic and recipe above)
    lr_student: float = 1e-5
    lr_critic: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_tangent("rcm")
        if self.dmd_weight < 0 or self.scm_weight < 0 or self.dmd_start < 0:
            raise ConfigError("rcm.dmd_weight, scm_weight and dmd_start must be >= 0")
        if self.dmd_weight == 0 and self.scm_weight == 0:
            raise ConfigError("rcm needs dmd_weight > 0 or scm_weight > 0")


class RCM(DMD2):
    config_class = RCMConfig

    @classmethod
    def needs(cls, cfg: RCMConfig) -> Needs:
        """DMD2's critic; real data for the sCM term."""
        return Needs(critic="copy", real_images="rCM's consistency term noises real data",
                     copies_student=cfg.target_ema > 0)

    def __init__(self, cfg: RCMConfig, models):  # noqa: ANN001
        super().__init__(cfg, models)
        self.term = TangentTerm(cfg, models, seed=models.seed + 3)
        self._updates = 0

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        self._updates = self.student_updates(step)
        return super().loss(phase, batch, generator, step)

    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        loss, logs = torch.zeros(()), {}
        if cfg.scm_weight > 0:
            loss, logs = self.term.loss(batch.real, batch.real_cond, generator, self._updates)
            loss = cfg.scm_weight * loss
        if cfg.dmd_weight > 0 and self._updates >= cfg.dmd_start:
            dm, dm_logs = super().student_loss(batch, generator)
            loss, logs = loss.to(dm.device) + cfg.dmd_weight * dm, {**logs, **dm_logs}
        return loss, logs

    def after_update(self, phase: str, step: int) -> None:
        if phase == "student":
            self.term.target.update()

    def state_dict(self) -> dict[str, Tensor]:
        return self.term.target.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.term.target.load_state_dict(state)
