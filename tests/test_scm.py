"""sCM's pieces: TrigFlow on the teacher's own path, the tangent, and the Jacobian-vector product two ways.

- The TrigFlow map puts a TrigFlow point at the teacher's point of the same noise-to-signal ratio (VP table and flow
  path alike), and is continuous where the VP table is discrete.
- The stabilised tangent at r = 1 is cos(t) df/dt along the teacher's ODE (a finite difference of the student's
  own x0 along the ODE checks it), so a wrong sign or a dropped term of g fails here.
- `torch.func.jvp` and the finite-difference fallback agree on the tiny SD 1.5, SDXL, SD3 and Flux networks.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config

from distill_diffusion.denoiser import Cond
from distill_diffusion.methods.scm import TangentTerm, tangent
from distill_diffusion.process import NoiseProcess
from distill_diffusion.teachers import load_pipeline
from distill_diffusion.trainer import Trainer
from distill_diffusion.trigflow import TrigFlow


def sd_process() -> NoiseProcess:
    from diffusers import DDPMScheduler

    return NoiseProcess.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012))


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("sigma_data", [0.5, 2.0])
def test_trigflow_points_are_the_teachers_points_of_the_same_snr(kind: str, sigma_data: float) -> None:
    process = sd_process() if kind == "vp" else NoiseProcess("flow", "flow")
    trig = TrigFlow(process, sigma_data)
    t = torch.linspace(trig.t_min, trig.t_max, 37, dtype=torch.float64)
    tau = trig.timestep(t)
    alpha, sigma = process.alpha_sigma(tau, torch.zeros(len(t), dtype=torch.float64))
    c = trig.scale(t)
    # x_tau = c x_trig = c cos t x0 + c sin t sigma_d eps: the teacher's alpha and sigma at tau
    torch.testing.assert_close(alpha.flatten(), c * t.cos(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(sigma.flatten(), c * sigma_data * t.sin(), atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(trig.of_timestep(tau), t, atol=1e-9, rtol=1e-7)
    assert abs(float(tau[-1]) - process.first_timestep()) < 1e-6  # t_max is the student's first timestep


def test_vp_schedule_is_the_table_at_integers_and_continuous_between() -> None:
    process = sd_process()
    table = process.alphas_cumprod
    torch.testing.assert_close(process.alpha_bar(torch.arange(1000, dtype=torch.float64)), table, atol=1e-12,
                               rtol=1e-10)
    mid = process.alpha_bar(torch.arange(999, dtype=torch.float64) + 0.5)
    assert bool(((mid < table[:-1]) & (mid > table[1:])).all())  # strictly between its neighbours
    _, slope = torch.func.jvp(process.alpha_bar, (torch.tensor([500.3], dtype=torch.float64),),
                              (torch.ones(1, dtype=torch.float64),))
    assert math.isclose(float(slope), float(table[501] - table[500]), rel_tol=0.02)


def mixture_term(jvp: str = "autograd") -> tuple[TangentTerm, Trainer]:
    trainer = Trainer(make_config("scm", args={"sigma_data": 2.0, "jvp": jvp}, model={"timesteps": [999],
                                                                                     "mlp_smooth": True}))
    with torch.no_grad():  # a student that is not the teacher: a correction of the right size to see
        for p in trainer.models.student.denoiser.net.out.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return TangentTerm(trainer.method.cfg, trainer.models, seed=0), trainer


def test_the_tangent_is_cos_t_times_the_total_derivative_of_f() -> None:
    term, trainer = mixture_term()
    m = trainer.models
    gen = torch.Generator().manual_seed(1)
    labels = m.mixture.balanced_labels(64)
    cond = Cond(labels=labels)
    x0 = m.mixture.sample(labels, gen).double()
    t = torch.linspace(0.05, term.trig.t_max, 64, dtype=torch.float64)
    x = term.trig.noised(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), t)

    def F(x_, t_):  # noqa: N802, ANN001, ANN202
        return term.trig.F(lambda xt, tau: m.student(xt.float(), tau.float(), cond).double(), x_, t_)

    def f(x_, t_):  # noqa: ANN001, ANN202
        return t_.cos()[:, None] * x_ - t_.sin()[:, None] * 2.0 * F(x_, t_)

    with torch.no_grad():
        dxdt = term.teacher_velocity(x.float(), t, cond, 1.0).double()
        F_minus, dF = term.tangent_of_F(F, x, t, dxdt)  # noqa: N806
        cos = t.cos()[:, None]
        g = tangent(F_minus, dF, dxdt, x, t, 2.0)  # the method's own, at r = 1
        h = 1e-3
        dfdt = (f(x + h * dxdt, t + h) - f(x - h * dxdt, t - h)) / (2 * h)
    err = (g - cos * dfdt).norm() / g.norm()
    assert err < 0.02, float(err)
    assert g.norm() > 0.1  # a student away from consistency: there is a tangent to get right


def test_jvp_and_finite_difference_agree_on_the_mixture() -> None:
    (a, trainer), (b, _) = mixture_term("autograd"), mixture_term("finite_difference")
    m = trainer.models
    cond = Cond(labels=m.mixture.balanced_labels(32))
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2)) * 2
    t = torch.linspace(0.1, a.trig.t_max, 32, dtype=torch.float64)

    def F(x_, t_):  # noqa: N802, ANN001, ANN202
        return a.trig.F(lambda xt, tau: m.student(xt, tau, cond), x_, t_)

    with torch.no_grad():
        dxdt = a.teacher_velocity(x, t, cond, 1.0)
        _, d_jvp = a.tangent_of_F(F, x, t, dxdt)
        _, d_fd = b.tangent_of_F(F, x, t, dxdt)
    assert ((d_jvp - d_fd).norm() / d_jvp.norm()) < 1e-2


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_jvp_and_finite_difference_agree_on_tiny_networks(kind: str, tiny_dirs: dict[str, str]) -> None:
    """The tangent through a real UNet / MMDiT (attention under the math kernel) two ways; the relative difference is
    recorded in docs/BENCHMARKS.md (``bench/jvp.py``)."""
    from distill_diffusion.assembly import assemble

    cfg = make_config("scm", tiny_dirs[kind], model={"timesteps": [999] if kind in ("sd15", "sdxl") else [1000]},
                      data={"prompts": ["a red car"], "real": "digits"})
    models = assemble(cfg, train=False).models
    term = TangentTerm(cfg.method_args, models, seed=0)
    cond = models.text.encode(["a red car", "a blue bird"])
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(0)) * 0.5
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)

    def F(x_, t_):  # noqa: N802, ANN001, ANN202
        return term.trig.F(lambda xt, tau: models.student(xt, tau, cond), x_, t_)

    with torch.no_grad():
        dxdt = term.teacher_velocity(x, t, cond, 1.0)
        term.cfg.jvp = "autograd"
        _, d_jvp = term.tangent_of_F(F, x, t, dxdt)
        term.cfg.jvp = "finite_difference"
        _, d_fd = term.tangent_of_F(F, x, t, dxdt)
    rel = float((d_jvp - d_fd).norm() / d_jvp.norm())
    assert torch.isfinite(d_jvp).all() and d_jvp.norm() > 0
    assert rel < 2e-2, rel
    load_pipeline.cache_clear() if hasattr(load_pipeline, "cache_clear") else None


def test_the_loss_weights_normalises_and_adapts_as_the_paper_says() -> None:
    """The loss assembled from its pieces, drawn with the same generator: g / (||g|| + 0.1), the time weight
    1 / (sigma_d tan t), exp(-w(t)) and + w(t) (w's bias set to 0.5 so a flipped or dropped w shows)."""
    term, trainer = mixture_term()
    term.cfg.time_weight, term.cfg.tangent_warmup = "inv_tan", 0
    assert term.logvar is trainer.models.student.scm_logvar  # the adaptive weight is on by default
    with torch.no_grad():
        term.logvar.linear.bias.fill_(0.5)
    m = trainer.models
    labels = m.mixture.balanced_labels(64)
    x0 = m.mixture.sample(labels, torch.Generator().manual_seed(3))
    cond = Cond(labels=labels)
    loss, _ = term.loss(x0, cond, torch.Generator().manual_seed(4), step=10)
    # the same draws, assembled by hand
    from distill_diffusion import draws

    gen = torch.Generator().manual_seed(4)
    t = term.trig.sample_times(64, term.cfg.p_mean, term.cfg.p_std, gen)
    x = term.trig.noised(x0, draws.randn(x0.shape, gen, x0), t)

    def F(x_, t_):  # noqa: N802, ANN001, ANN202
        return term.trig.F(lambda xt, tau: m.student(xt, tau, cond), x_, t_)

    with torch.no_grad():
        dxdt = term.teacher_velocity(x, t, cond, 1.0)
        F_minus, dF = term.tangent_of_F(F, x, t, dxdt)  # noqa: N806
        g = tangent(F_minus, dF, dxdt, x, t, 2.0)
        g = g / (g.norm(dim=1, keepdim=True) + 0.1)
        expected = (1 / (2.0 * t.tan()).float() * math.exp(-0.5) * g.pow(2).mean(1) + 0.5).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
