"""f-distill (issue 27; Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching"), each
piece pinned so a wrong weight fails: each h(r) is f''(r) r^2 of its divergence up to a constant; the ratio is read off
the GAN head's logit, clipped and normalised per t-bin and per batch; every student loss of the family takes it per
sample; the unequal-weight mixture it is measured on draws and denoises by its weights. The known-answer measurement
(shares of small classes) is in the slow tier, tests/test_score_known_answer.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from distill_diffusion.denoiser import Cond
from distill_diffusion.methods import score
from distill_diffusion.trainer import Trainer


def one_step_trainer(method: str = "dmd2", **args: object) -> Trainer:
    """A 1-step mixture student of ``method`` with ``args``, one critic update per student update."""
    return Trainer(make_config(method, args={"critic_updates": 1, **args}, model={"timesteps": [999]}))


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "js", "hellinger", "neyman"])
def test_each_f_weight_is_f_second_derivative_times_r_squared(name: str) -> None:
    """h(r) = f''(r) r^2 up to a constant (f-distill, Table 1): f of each divergence, differentiated twice here."""
    fs = {
        "reverse_kl": lambda r: -r.log(),
        "forward_kl": lambda r: r * r.log(),
        "js": lambda r: r * r.log() - (r + 1) * ((r + 1) / 2).log(),
        "hellinger": lambda r: (r.sqrt() - 1) ** 2,
        "neyman": lambda r: (1 - r) ** 2 / r,
    }
    r = torch.linspace(0.1, 20, 50, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(fs[name](r).sum(), r, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), r)
    want = d2 * r.detach() ** 2
    got = score.F_WEIGHTS[name](r.detach())
    ratio = got / want
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))


def test_f_weight_reads_the_gan_heads_ratio_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    """forward KL weights each sample by r = exp(logit), clipped, divided by its t-bin's mean, then by the batch mean:
    built by hand from the logits the head returns."""
    trainer = one_step_trainer(f_divergence="forward_kl", gan_critic_weight=1e-2, f_ratio_bins=2)
    method = trainer.method
    method._gan_now = True
    logits = torch.tensor([0.0, 1.0, -1.0, 4.0, -4.0, 0.5])
    monkeypatch.setattr(score.gan, "logits", lambda *a: logits)
    t = torch.tensor([100, 200, 300, 700, 800, 900])  # bins: [20, 500) and [500, 980]
    h = method.f_weight(torch.zeros(6, 2), t, Cond(labels=torch.zeros(6)))
    r = logits.exp().clamp(0.1, 20)
    r = torch.cat([r[:3] / r[:3].mean(), r[3:] / r[3:].mean()])
    torch.testing.assert_close(h, r / r.mean())
    want = {"f_h_min": (r / r.mean()).min().item(), "f_h_max": (r / r.mean()).max().item(),
            "f_logit_std": logits.std().item()}  # the step's logs: what the weighting does
    assert method.f_logs == pytest.approx(want)
    method._gan_now = False  # before the head trains (gan_start): DMD's weight
    assert method.f_weight(torch.zeros(6, 2), t, Cond(labels=torch.zeros(6))) is None and method.f_logs == {}


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd"])
def test_each_student_loss_takes_the_f_weight_per_sample(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the head's logits fixed, the forward-KL student gradient of each sample is h(r) times its reverse-KL
    gradient (the same draws), for every member of the family."""
    logits = torch.linspace(-2, 2, 16)
    monkeypatch.setattr(score.gan, "logits", lambda *a: logits)
    grads = {}
    for f in ("reverse_kl", "forward_kl"):
        trainer = one_step_trainer(method, f_divergence=f, gan_critic_weight=1e-2, f_ratio_bins=0)
        with torch.no_grad():  # a critic away from the teacher, the same in both runs
            weight = trainer.models.critic.net.out.weight
            torch.nn.init.normal_(weight, 0, 0.3, generator=torch.Generator().manual_seed(2))
        gen = torch.Generator().manual_seed(0)
        batch = trainer.data.sample(16, gen)
        x = trainer.models.student(batch.noise, torch.full((16,), 999), batch.cond).detach().requires_grad_(True)
        monkeypatch.setattr(type(trainer.method), "score_sample", lambda self, b, g, grad, x=x: (x, b.cond, 0))
        trainer.method._gan_now = True
        loss, _ = trainer.method.student_loss(batch, gen)
        (grads[f],) = torch.autograd.grad(loss, x)
        monkeypatch.setattr(type(trainer.method), "score_sample", score.ScoreMethod.score_sample)
    h = logits.exp().clamp(0.1, 20)
    h = h / h.mean()
    torch.testing.assert_close(grads["forward_kl"], grads["reverse_kl"] * h[:, None], atol=1e-7, rtol=1e-5)


def test_a_weighted_unconditional_mixture_draws_and_denoises_by_its_weights() -> None:
    """The classes are drawn by their weights; at x_t = 0 (equidistant from both means) the exact posterior mean is the
    weighted mean shrunk by (1 - a * gain); an unconditional task hands every role the null class, its real samples
    keeping the weights."""
    from distill_diffusion.gmm import GaussianMixture, MixtureDenoiserNet

    trainer = Trainer(make_config("dmd2", args={"f_divergence": "js", "gan_critic_weight": 1e-2}, model={
        "gmm_classes": 2, "gmm_radius": 2.0, "gmm_std": 0.5, "gmm_weights": [0.8, 0.2], "gmm_unconditional": True}))
    mixture = trainer.models.mixture
    assert isinstance(mixture, GaussianMixture) and not mixture.conditional
    labels = mixture.draw_labels(20000, torch.Generator().manual_seed(0))
    assert abs(float((labels == 1).float().mean()) - 0.2) < 0.01
    batch = trainer.data.sample(4000, torch.Generator().manual_seed(1))
    assert bool((batch.cond.labels == -1).all()) and abs(float((batch.real[:, 0] < 0).float().mean()) - 0.2) < 0.03
    exact = MixtureDenoiserNet(mixture, trainer.models.process)
    t = torch.tensor([300, 700])
    x0 = exact(torch.zeros(2, 2), t, Cond(labels=torch.full((2,), -1)))
    a, sigma = trainer.models.process.alpha_sigma(t, torch.zeros(2, 1, dtype=torch.float64))
    gain = a * 0.25 / (a**2 * 0.25 + sigma**2)
    want = (1 - a * gain) * (0.8 * mixture.means[0] + 0.2 * mixture.means[1]).double()
    torch.testing.assert_close(x0.double(), want, atol=1e-5, rtol=1e-5)
    equal = MixtureDenoiserNet(GaussianMixture.ring(2, 2.0, 0.5), trainer.models.process)
    assert float(equal(torch.zeros(2, 2), t, Cond(labels=torch.full((2,), -1))).abs().max()) < 1e-6
