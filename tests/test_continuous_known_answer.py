"""Continuous-time students on the known answer (slow tier): sCM, rCM and MeanFlow (flow-map) students of the
Gaussian mixture under the VP and the flow path meet the bar at 1 step, and the same weights sampled at 2 and 4 steps
meet it too; the falsifications (sCM's tangent's sign flipped or its JVP replaced by zero, rCM's DMD term flipped,
MeanFlow's (s - r) du/ds term flipped or its derivative replaced by zero) do not.
Configs: configs/gmm_{,flow_}{scm,rcm,meanflow}.yaml; three seeds of each in docs/BENCHMARKS.md
(`bench/known_answer.py --sample-steps 2 4`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_flow_mixture import meets_bar

from distill_diffusion.config import load_config
from distill_diffusion.denoiser import Cond
from distill_diffusion.eval.mixture import mixture_metrics
from distill_diffusion.methods import meanflow as meanflow_module
from distill_diffusion.methods import scm as scm_module
from distill_diffusion.methods.dmd2 import DMD2
from distill_diffusion.preview import student_samples
from distill_diffusion.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def train(tmp_path: Path, config: str, *overrides: str) -> Trainer:
    trainer = Trainer(load_config(CONFIGS / config, ["train.progress=false", *overrides]), tmp_path / "run")
    trainer.metrics = trainer.train()
    return trainer


def resampled(trainer: Trainer, steps: int) -> dict[str, float]:
    """The trained student's samples on the process's trailing ``steps``-step grid."""
    models = trainer.models
    models.student.timesteps = models.process.trailing_timesteps(steps)
    labels = models.mixture.balanced_labels(trainer.cfg.train.eval_samples)
    return mixture_metrics(student_samples(models, Cond(labels=labels), len(labels)), labels, models.mixture)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["gmm_scm.yaml", "gmm_flow_scm.yaml", "gmm_rcm.yaml", "gmm_flow_rcm.yaml",
                                    "gmm_meanflow.yaml", "gmm_flow_meanflow.yaml"])
def test_continuous_time_student_matches_the_mixture_at_1_2_and_4_steps(tmp_path: Path, config: str) -> None:
    trainer = train(tmp_path, config)
    assert meets_bar(trainer.metrics), trainer.metrics
    for steps in (2, 4):
        m = resampled(trainer, steps)
        assert meets_bar(m), (steps, m)


@pytest.mark.slow
@pytest.mark.parametrize("falsification", ["flipped_tangent", "zero_jvp"])
def test_scm_with_a_wrong_tangent_fails(tmp_path: Path, falsification: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if falsification == "flipped_tangent":
        right = scm_module.tangent
        monkeypatch.setattr(scm_module, "tangent", lambda *a, **k: -right(*a, **k))
    else:
        right_jvp = scm_module.TangentTerm.tangent_of_F

        def zero_jvp(self, fn, x, t, dxdt):  # noqa: ANN001, ANN202
            F, dF = right_jvp(self, fn, x, t, dxdt)  # noqa: N806
            return F, torch.zeros_like(dF)

        monkeypatch.setattr(scm_module.TangentTerm, "tangent_of_F", zero_jvp)
    m = train(tmp_path, "gmm_scm.yaml").metrics
    assert not meets_bar(m), m


@pytest.mark.slow
def test_rcm_with_the_dmd_term_flipped_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    right = DMD2.student_loss

    def flipped(self, batch, generator):  # noqa: ANN001, ANN202
        loss, logs = right(self, batch, generator)
        return -loss, logs

    monkeypatch.setattr(DMD2, "student_loss", flipped)
    m = train(tmp_path, "gmm_rcm.yaml").metrics
    assert not meets_bar(m), m


@pytest.mark.slow
@pytest.mark.parametrize("falsification", ["flipped", "zero"])
def test_meanflow_with_a_wrong_derivative_fails(tmp_path: Path, falsification: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The target v - (s - r) du/ds with that term's sign flipped, or du/ds replaced by zero (then u learns the
    instantaneous velocity for every r, and one step is one Euler step of the teacher)."""
    right = meanflow_module.derivative_along

    def wrong(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        u, du = right(*args, **kwargs)
        return u, -du if falsification == "flipped" else torch.zeros_like(du)

    monkeypatch.setattr(meanflow_module, "derivative_along", wrong)
    m = train(tmp_path, "gmm_flow_meanflow.yaml").metrics
    assert not meets_bar(m), m
