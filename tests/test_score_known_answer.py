"""The score-distillation family on the exact Gaussian-mixture teacher: each 1-step student must match true samples,
and each broken variant must not.

Bar (issue 5): after at most 1000 generator steps, energy distance <= 0.004, per-class std ratio in [0.7, 1.35],
coverage >= 0.9 on 4000 class-balanced samples. The teacher's own 1-step DDIM sits at ED ~0.026, std ratio 0.02.
Each method runs its shipped config (configs/gmm_<method>.yaml) with CFG 1 everywhere.

What these tests prove, exactly: each method's student loss with a critic trained on x0-MSE, the mixture networks'
native target (critic_target: native), as NVlabs/FastGen trains its fake score (fake_score_pred_type "x0"). The
official code trains the critic differently (DMD2: epsilon-MSE, i.e. SNR(t)-weighted in x0; SiD: EDM's
(SNR + 1/sigma_data^2) weighting), which on this teacher converges more slowly (issue 21: DMD2 reaches the bar after
800-900 updates with epsilon-MSE, 200-300 with x0-MSE); on SD teachers "native" is epsilon, the official way. The
student losses themselves are pinned against the references' formulas in tests/test_golden.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, trainer_for

from distill_diffusion import step_aware
from distill_diffusion.config import load_config
from distill_diffusion.eval.density_ratio import ratio_agreement
from distill_diffusion.eval.mixture import energy_distance, per_step_metrics, std_ratio
from distill_diffusion.methods import DMD2, METHODS

FAMILY = ["dmd2", "sid", "vsd"]


def meets_bar(m: dict[str, float]) -> bool:
    return m["energy_distance"] <= 0.004 and 0.7 <= m["std_ratio"] <= 1.35 and m["coverage"] >= 0.9


def generator_steps(config: str) -> int:
    cfg = load_config(CONFIGS / f"gmm_{config}.yaml")
    return cfg.train.steps // (cfg.method_args.critic_updates + 1)


def flipped(cls: type) -> type:
    """The method with its generator loss negated: the student is pushed away from the data."""

    class Flipped(cls):
        def student_loss(self, batch, generator):  # noqa: ANN001, ANN201
            loss, logs = super().student_loss(batch, generator)
            return -loss, logs

    return Flipped


def random_frozen_critic(cls: type) -> type:
    """The method with a critic set to random weights and never trained: its 'fake score' knows nothing."""

    class RandomCritic(cls):
        def __init__(self, cfg, models):  # noqa: ANN001
            super().__init__(cfg, models)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                torch.nn.init.normal_(models.critic.net.out.weight, std=0.5)

        def phase(self, step: int) -> str:
            return "student"

    return RandomCritic


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_one_step_student_matches_the_mixture(tmp_path: Path, method: str) -> None:
    assert generator_steps(method) <= 1000
    m = trainer_for(tmp_path, method).train()
    assert meets_bar(m), m


@pytest.mark.slow
def test_dmd2_gan_term_with_true_samples_does_not_hurt(tmp_path: Path) -> None:
    """DMD2's GAN head trained on true mixture samples (the paper's weights 1e-3 / 1e-2): still meets the bar.
    Measured without GAN: ED 0.0004; with: 0.0006 (both seed 0)."""
    m = trainer_for(tmp_path, "dmd2", None, "dmd2.gan_student_weight=1e-3", "dmd2.gan_critic_weight=1e-2").train()
    assert meets_bar(m), m
    assert m["energy_distance"] <= 0.002, m


@pytest.mark.slow
def test_sida_gan_term_with_true_samples_does_not_hurt(tmp_path: Path) -> None:
    """SiD with the critic's GAN head (student weight 1, the critic's 1e-2) and true mixture samples as real data:
    still meets the bar. Measured (seeds 0 / 1 / 2, 1000 generator updates, `bench/known_answer.py`, 2026-12-02):
    SiDA ED 0.0012 / 0.0007 / 0.0018, std ratio 0.97 / 0.96 / 1.00; SiD alone 0.0007 / 0.0010 / 0.0007. An earlier
    docstring's SiD 0.0027 / 0.76 for seed 0 does not reproduce (0.0007 / 1.00 on three reruns)."""
    m = trainer_for(tmp_path, "sid", None, "sid.gan_student_weight=1", "sid.gan_critic_weight=1e-2").train()
    assert meets_bar(m), m
    assert m["energy_distance"] <= 0.0015 and m["std_ratio"] >= 0.85, m


def test_dmd2_gan_head_learns_to_tell_true_samples_from_the_collapsed_student(tmp_path: Path) -> None:
    """With the student held at the teacher's collapsed 1-step DDIM, critic updates alone must teach the head to
    score true samples above the student's (at t = 20, where they differ): the GAN term is live, not a constant.
    Measured margin after 1200 critic updates: 0.31 (0.00 at init)."""
    from distill_diffusion.methods import gan

    class CriticOnly(DMD2):
        def phase(self, step: int) -> str:
            return "critic"

    METHODS["dmd2_critic_only"] = CriticOnly
    try:
        trainer = trainer_for(tmp_path, "dmd2", "dmd2_critic_only", "dmd2_critic_only.gan_critic_weight=1e-2",
                              "train.steps=1200")
    finally:
        del METHODS["dmd2_critic_only"]
    m = trainer.models

    def margin() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            b = trainer.data.sample(2048, g)
            x = m.student.sample(b.noise, b.cond, g)
            t = torch.full((len(x),), 20)
            eps = torch.randn(x.shape, generator=g)
            d_fake = gan.logits(m.critic, m.process.add_noise(x, eps, t), t, b.cond).mean()
            d_real = gan.logits(m.critic, m.process.add_noise(b.real, eps, t), t, b.real_cond).mean()
        return float(d_real - d_fake)

    assert abs(margin()) < 0.01
    for _ in range(1200):
        trainer.train_step()
    assert margin() > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_flipped_sign_fails(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, f"{method}_flipped", flipped(METHODS[method]))
    cfg = load_config(CONFIGS / f"gmm_{method}.yaml")
    steps = 300 * (cfg.method_args.critic_updates + 1)  # 300 generator steps
    m = trainer_for(tmp_path, method, f"{method}_flipped", f"train.steps={steps}").train()
    assert not meets_bar(m), m
    assert m["energy_distance"] > 0.03, m  # worse than the teacher's collapsed 1-step DDIM (0.026)


@pytest.mark.slow
@pytest.mark.parametrize("method", FAMILY)
def test_random_frozen_critic_fails(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, f"{method}_random", random_frozen_critic(METHODS[method]))
    m = trainer_for(tmp_path, method, f"{method}_random", "train.steps=300").train()
    assert not meets_bar(m), m


class FrozenCriticDMD2(DMD2):
    """DMD2 whose critic is never updated: the critic stays equal to the teacher and the gradient is exactly zero."""

    def phase(self, step: int) -> str:
        return "student"


def test_frozen_critic_fails_and_leaves_the_student_at_ddim1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, "dmd2_frozen", FrozenCriticDMD2)
    trainer = trainer_for(tmp_path, "dmd2", "dmd2_frozen", "train.steps=200")
    before = {k: v.clone() for k, v in trainer.models.student.state_dict().items()}
    for _ in range(5):
        _, logs = trainer.train_step()
        assert logs["dm_grad_norm"] == 0.0  # critic == teacher, so real and fake scores agree exactly
    after = trainer.models.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    m = trainer.train()
    assert not meets_bar(m), m
    assert m["std_ratio"] < 0.1, m  # collapsed onto the class means like DDIM-1 (0.02)
    assert m["coverage"] > 0.99, m  # coverage alone cannot see the collapse


def wrong_step_critic(cls: type) -> type:
    """The student's loss reads the critic at another step than the one that made the sample (k + 2 mod K): the fake
    score of another step's outputs. The critic's own training is unchanged."""

    class WrongStep(cls):
        def score_sample(self, batch, generator, grad):  # noqa: ANN001, ANN201
            x, cond, k = super().score_sample(batch, generator, grad)
            if grad:  # the student's loss (the critic's loss samples without gradient)
                K = len(self.models.student.timesteps)
                cond = step_aware.with_student_step(cond, (k + 2) % K, len(x))
            return x, cond, k

    return WrongStep


def reversed_intervals(cls: type) -> type:
    """Step k's samples noised inside step K-1-k's interval instead of its own (critic and student alike)."""

    class Reversed(cls):
        def step_range(self, k: int, critic: bool = False) -> tuple[float, float]:
            return super().step_range(len(self.models.student.timesteps) - 1 - k, critic)

    return Reversed


@pytest.mark.slow
def test_four_step_tdm_student_matches_the_mixture_at_every_step(tmp_path: Path) -> None:
    """Issue 27: with the step-aware critic (critic_steps conditioned, step_times own) the 4-step student's final
    samples and each step's own output meet the bar (measured seed 0, 1000 student updates: final ED 0.0011 / std
    ratio 0.94; per step 0.0013 / 0.0025 / 0.0014 / 0.0012, std ratios 1.04 / 1.29 / 1.15 / 0.97)."""
    assert generator_steps("tdm") <= 1000
    trainer = trainer_for(tmp_path, "tdm")
    m = trainer.train()
    assert meets_bar(m), m
    steps = per_step_metrics(trainer.models, 4000)
    assert all(meets_bar(s) for s in steps), steps


@pytest.mark.slow
def test_four_step_student_with_a_shared_critic_misses_the_bar(tmp_path: Path) -> None:
    """The defect kept as a test: the same config with DMD2's shared critic over the full range (measured seed 0:
    ED 0.0100, std ratio 0.36)."""
    m = trainer_for(tmp_path, "tdm", None, "tdm.critic_steps=shared", "tdm.step_times=full").train()
    assert not meets_bar(m), m


@pytest.mark.slow
@pytest.mark.parametrize("variant", [wrong_step_critic, reversed_intervals])
def test_tdm_with_a_wrong_step_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant) -> None:  # noqa: ANN001
    """Falsifications of the two new terms: the critic read at another step in the student's loss; each step noised
    inside another step's interval."""
    monkeypatch.setitem(METHODS, "tdm_wrong", variant(METHODS["tdm"]))
    trainer = trainer_for(tmp_path, "tdm", "tdm_wrong")
    m = trainer.train()
    steps = per_step_metrics(trainer.models, 4000)
    assert not (meets_bar(m) and all(meets_bar(s) for s in steps)), (m, steps)


@pytest.mark.slow
def test_f_distill_reads_the_density_ratio_and_forward_kl_keeps_the_shares_closer(tmp_path: Path) -> None:
    """configs/gmm_dmd2_fdistill.yaml (four classes, weights 0.6 / 0.25 / 0.1 / 0.05, an unconditional 1-step student)
    at seed 0, reverse and forward KL. The weight's input first: the GAN head's logit against the true log r at the
    noised student samples (`eval.density_ratio`; p_t analytic, q_t the student's own samples noised), correlation
    0.79 / 0.75 / 0.70 (reverse KL) and 0.72 / 0.71 / 0.76 (forward KL) at t = 0.05 / 0.1 / 0.2 of T; with the head's
    real and fake labels swapped it turns negative, and at DMD2's gan_critic_weight 1e-2 it was 0.10-0.54 with a
    tenth of log r's spread (docs/BENCHMARKS.md). Then the paper's prediction: share error 0.043 (forward KL) against
    0.077 (reverse KL); over seeds 0-4 in docs/BENCHMARKS.md, where the weight flipped to 1 / r (neyman) is worse."""
    runs = {}
    for divergence in ("reverse_kl", "forward_kl"):
        (tmp_path / divergence).mkdir()
        trainer = trainer_for(tmp_path / divergence, "dmd2_fdistill", "dmd2", f"dmd2.f_divergence={divergence}")
        runs[divergence] = trainer.train(), ratio_agreement(trainer.models, [0.05, 0.1, 0.2], 4000)
    for divergence, (m, rows) in runs.items():
        assert all(r["corr"] > 0.5 for r in rows), (divergence, rows)
        assert min(m[f"share_{k}"] for k in range(4)) > 0.03, (divergence, m)  # no class lost
    (fkl, _), (rkl, _) = runs["forward_kl"], runs["reverse_kl"]
    assert fkl["share_error"] < 0.75 * rkl["share_error"], (fkl, rkl)


def flipped_guidance(cls: type) -> type:
    """The method with Decoupled DMD's guidance term negated: the student is pushed away from the guided teacher."""

    class Flipped(cls):
        def guidance_term(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return -super().guidance_term(*args, **kwargs)

    return Flipped


def class_spread(x: torch.Tensor, labels: torch.Tensor, mixture) -> float:  # noqa: ANN001
    """Mean over classes of the RMS distance of a class's samples to their own mean (`std_ratio` in data units)."""
    return std_ratio(x, labels, mixture) * mixture.std * mixture.dim**0.5


def class_radius(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance of the class means from their centre: guidance moves each class away from the others."""
    means = torch.stack([x[labels == c].mean(0) for c in labels.unique()])
    return (means - means.mean(0)).norm(dim=1).mean().item()


def guided_student_metrics(trainer, w: float) -> dict[str, float]:  # noqa: ANN001
    """Train, then measure the student's samples against the guided teacher's 50-step DDIM (the guided ODE has no
    closed form; fixed noise and labels, as the w-conditioned rows of test_trajectory_known_answer.py) and against
    true samples: energy distances, and the per-class spread and class-mean radius of each."""
    from test_trajectory_known_answer import guided_cond, student_and_guided_ode

    trainer.train()
    models, mix = trainer.models, trainer.models.mixture
    labels = guided_cond(models, w).labels
    x, ode = student_and_guided_ode(models, w)
    true = mix.sample(labels, torch.Generator().manual_seed(7))
    return {"ed_to_guided_ode": energy_distance(x, ode), "ed_to_data": energy_distance(x, true),
            "spread": class_spread(x, labels, mix), "ode_spread": class_spread(ode, labels, mix),
            "true_spread": class_spread(true, labels, mix), "radius": class_radius(x, labels),
            "ode_radius": class_radius(ode, labels), "true_radius": class_radius(true, labels)}


def decoupled_run(tmp_path: Path, method: str | None = None) -> dict[str, float]:
    """configs/gmm_tdm.yaml (a 4-step student) distilled from the teacher guided at w = 2, `cfg_times: decoupled`."""
    section = method or "tdm"
    return guided_student_metrics(trainer_for(tmp_path, "tdm", method, f"{section}.teacher_cfg=2.0",
                                              f"{section}.cfg_times=decoupled"), 2.0)


def keeps_guidance(m: dict[str, float]) -> bool:
    """Guided the right way: sharper than the data, class means not pulled inward, near the guided ODE. Measured
    (python bench/decoupled.py, seeds 0 / 1, 1000 updates): decoupled ED to the guided DDIM-50 0.0164 / 0.0124, class
    spread 0.159 / 0.160 (the ODE's 0.21, the data's 0.42), class-mean radius 4.00 / 4.02 (the data's 4.01, the ODE's
    4.19); DMD2's shared level 0.0108 / 0.0130, 0.169 / 0.167, 4.04 / 4.03. Neither reaches the guided ODE (an
    untrained student, the teacher's own 4-step DDIM, scores 0.0144 / 0.157 / 4.01), so this pins the guidance
    term's direction, not that decoupling helps (docs/BENCHMARKS.md)."""
    return (m["ed_to_guided_ode"] <= 0.025 and m["spread"] < 0.5 * m["true_spread"]
            and m["radius"] > m["true_radius"] - 0.05)


@pytest.mark.slow
def test_decoupled_guidance_student_keeps_the_guided_direction(tmp_path: Path) -> None:
    m = decoupled_run(tmp_path)
    assert keeps_guidance(m), m


@pytest.mark.slow
def test_decoupled_guidance_with_its_guidance_term_flipped_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """The falsification (measured seeds 0 / 1: ED 0.033 / 0.034, spread 1.02 / 0.57, wider than the data's, class
    means pulled inward to radius 3.81 / 3.89)."""
    monkeypatch.setitem(METHODS, "tdm_flipped_guidance", flipped_guidance(METHODS["tdm"]))
    m = decoupled_run(tmp_path, "tdm_flipped_guidance")
    assert not keeps_guidance(m), m
