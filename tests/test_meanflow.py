"""MeanFlow's pieces: flow time on the teacher's own path, the two-time networks, the flow-map sampler, the loss.

- A point of flow time s is the teacher's point of the same noise-to-signal ratio (VP table and flow path alike).
- Every two-time network (tiny SD 1.5, SDXL, SD3, Flux, the mixture MLP) computes exactly the teacher at
  initialisation whatever its end time, reads its end time once the new embedding is non-zero, and the UNet's loads
  in a stock ``UNet2DConditionModel``.
- The student's sampler is MeanFlow's x_r = x_s - (s - r) u, written out by hand in flow coordinates.
- The derivative in s through the network's second time (the interval depends on s) agrees two ways on tiny networks.
- The loss, assembled by hand from the same draws: the target's sign and (s - r) factor, the adaptive weight.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from distill_diffusion.denoiser import Cond
from distill_diffusion.errors import ConfigError
from distill_diffusion.flowtime import FlowTime
from distill_diffusion.methods.derivative import derivative_along
from distill_diffusion.process import CLEAN, NoiseProcess
from distill_diffusion.trainer import Trainer


def sd_process() -> NoiseProcess:
    from diffusers import DDPMScheduler

    return NoiseProcess.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_flow_time_points_are_the_teachers_points_of_the_same_snr(kind: str) -> None:
    process = sd_process() if kind == "vp" else NoiseProcess("flow", "flow")
    flow = FlowTime(process)
    s = torch.linspace(flow.s_min, flow.s_max, 41, dtype=torch.float64)
    tau = flow.timestep(s)
    alpha, sigma = process.alpha_sigma(tau, torch.zeros(len(s), dtype=torch.float64))
    k = flow.scale(s)
    torch.testing.assert_close(alpha.flatten(), k * (1 - s), atol=1e-9, rtol=1e-7)  # x_tau = k x_s
    torch.testing.assert_close(sigma.flatten(), k * s, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(flow.of_timestep(tau), s, atol=1e-9, rtol=1e-7)
    assert abs(float(tau[-1]) - process.first_timestep()) < 1e-6  # s_max is the student's first timestep
    assert float(flow.timestep(torch.zeros(1, dtype=torch.float64))) == CLEAN


def mixture_trainer(kind: str = "vp", **args: float) -> Trainer:
    trainer = Trainer(make_config("meanflow", args=args, model={"timesteps": [999] if kind == "vp" else [1000],
                                                                "mlp_smooth": True, "gmm_process": kind}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a student away from the teacher, reading its end time
        net = trainer.models.student.denoiser.net
        for p in [*net.out.parameters(), *net.end_time.parameters()]:
            p.normal_(0, 0.3, generator=gen)
    return trainer


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_the_sampler_is_meanflows_step_in_flow_coordinates(kind: str) -> None:
    trainer = mixture_trainer(kind)
    m = trainer.models
    flow = FlowTime(m.process)
    student = m.student
    student.timesteps = m.process.trailing_timesteps(4)
    labels = m.mixture.balanced_labels(16)
    cond = Cond(labels=labels)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = student.sample(noise, cond, torch.Generator().manual_seed(2))
        taus = torch.tensor([*student.timesteps, CLEAN], dtype=torch.float64)
        s_all = flow.of_timestep(taus)
        x = noise.double() / flow.scale(s_all[:1])  # the noise at the first timestep, in flow coordinates
        for i in range(4):
            s, r = s_all[i].expand(16), s_all[i + 1].expand(16)
            tau_s, tau_r = taus[i].expand(16), taus[i + 1].expand(16)
            x0 = student(flow.scale(s)[:, None].float() * x.float(), tau_s.float(),
                         Cond(labels=labels, end_timestep=tau_r.float())).double()
            u = (x - x0) / s[:, None]  # the average velocity from s to r
            x = x - (s - r)[:, None] * u
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)
    # and the end time matters: told its step ends at s itself, the same network predicts something else
    with torch.no_grad():
        tau = torch.full((16,), float(student.timesteps[0]))
        a = student(noise, tau, Cond(labels=labels, end_timestep=torch.full((16,), float(CLEAN))))
        b = student(noise, tau, Cond(labels=labels, end_timestep=tau))
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_two_time_networks_start_as_the_teacher_and_read_their_end_time(kind: str, tiny_dirs: dict[str, str],
                                                                       tmp_path) -> None:  # noqa: ANN001
    from distill_diffusion.assembly import assemble
    from distill_diffusion.two_time import reads_end_time

    vp = kind in ("sd15", "sdxl")
    cfg = make_config("meanflow", tiny_dirs[kind], model={"timesteps": [999] if vp else [1000]},
                      data={"prompts": ["a red car"], "real": "digits"})
    models = assemble(cfg, train=False).models
    net = models.student.denoiser.net
    assert reads_end_time(net) and not reads_end_time(models.teacher.denoiser.net)
    cond = models.text.encode(["a red car", "a blue bird"])
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([800.0, 300.0])
    ends = [None, torch.tensor([float(CLEAN), 100.0]), torch.tensor([500.0, 299.0])]
    with torch.no_grad():
        teacher = models.teacher.x0(x, t, cond)
        for end in ends:
            c = Cond(**{**cond.__dict__, "end_timestep": end})
            torch.testing.assert_close(models.student(x, t, c), teacher, atol=1e-5, rtol=1e-5)
        new = net.class_embedding if vp else net.time_text_embed.end_time_embed
        torch.nn.init.normal_(new.linear_2.weight, 0, 0.5, generator=torch.Generator().manual_seed(1))
        a, b = (models.student(x, t, Cond(**{**cond.__dict__, "end_timestep": e})) for e in ends[1:])
    assert (a - b).abs().max() > 1e-3
    if vp:  # diffusers' own timestep class embedding: a stock UNet loads it and computes the same
        from diffusers import UNet2DConditionModel

        net.save_pretrained(tmp_path / "unet")
        stock = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
        added = None if cond.pooled is None else {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        with torch.no_grad():
            want = net(x, t, cond.embeds, added_cond_kwargs=added, class_labels=t - ends[1]).sample
            got = stock(x, t, cond.embeds, added_cond_kwargs=added, class_labels=t - ends[1]).sample
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_the_derivative_in_s_agrees_two_ways_through_the_second_time(kind: str, tiny_dirs: dict[str, str]) -> None:
    """u(x, r, s) of a student whose end-time embedding is non-zero: its interval t - end depends on s, so a
    derivative that missed the embedding's path would disagree with the finite difference."""
    from distill_diffusion.assembly import assemble

    vp = kind == "sd15"
    cfg = make_config("meanflow", tiny_dirs[kind], model={"timesteps": [999] if vp else [1000]},
                      data={"prompts": ["a red car"], "real": "digits"})
    models = assemble(cfg, train=False).models
    net = models.student.denoiser.net
    new = net.class_embedding if vp else net.time_text_embed.end_time_embed
    with torch.no_grad():
        torch.nn.init.normal_(new.linear_2.weight, 0, 0.5, generator=torch.Generator().manual_seed(1))
    flow = FlowTime(models.process)
    cond = models.text.encode(["a red car", "a blue bird"])
    cond = Cond(**{**cond.__dict__, "end_timestep": flow.timestep(torch.tensor([0.1, 0.0])).float()})
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(0)) * 0.5
    s = torch.tensor([0.4, 0.8], dtype=torch.float64)

    def u(x_, s_):  # noqa: ANN001, ANN202
        return flow.velocity(lambda xt, tau: models.student(xt, tau, cond), x_, s_)

    with torch.no_grad():
        v = flow.velocity(lambda xt, tau: models.teacher.x0(xt, tau, cond), x, s)
        _, d_jvp = derivative_along(u, x, s, v, "autograd")
        _, d_fd = derivative_along(u, x, s, v, "finite_difference", 1e-4)
    rel = float((d_jvp - d_fd).norm() / d_jvp.norm())
    assert torch.isfinite(d_jvp).all() and d_jvp.norm() > 0
    assert rel < 2e-2, rel


def test_the_loss_is_the_meanflow_regression_with_its_adaptive_weight() -> None:
    """The loss from its pieces, with the same draws: target v - (s - r) du/ds along (v, 1), the per-sample sum of
    squares, weight 1 / (err + c)^p with p = 1 (a flipped sign, a dropped (s - r) or a wrong power shows)."""
    from distill_diffusion import draws
    from distill_diffusion.roles import Batch

    trainer = mixture_trainer("vp", flow_matching_ratio=0.25, consistency_ratio=0.25)
    method, m = trainer.method, trainer.models
    labels = m.mixture.balanced_labels(64)
    x0 = m.mixture.sample(labels, torch.Generator().manual_seed(3))
    cond = Cond(labels=labels)
    batch = Batch(cond=cond, noise=torch.zeros_like(x0), real=x0, real_cond=cond)
    loss, logs = method.loss("student", batch, torch.Generator().manual_seed(4), step=10)

    gen = torch.Generator().manual_seed(4)
    s, r = method.times(64, gen)
    assert (r == s).any() and (r == 0).any() and ((r > 0) & (r < s)).any()  # all three buckets drawn
    flow = method.flow
    x = flow.noised(x0, draws.randn(x0.shape, gen, x0), s)
    c = Cond(labels=labels, end_timestep=flow.timestep(r).float())

    def u(x_, s_):  # noqa: ANN001, ANN202
        return flow.velocity(lambda xt, tau: m.student(xt, tau, c), x_, s_)

    with torch.no_grad():
        v = flow.velocity(lambda xt, tau: m.teacher.x0(xt, tau, cond), x, s)
        u_now, du = torch.func.jvp(u, (x, s), (v, torch.ones_like(s)))
        err = (u_now - (v - (s - r).float()[:, None] * du)).pow(2).sum(1)
        expected = (err / (err + 1e-3)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    assert logs["du_norm"] > 0.1  # a student with a derivative worth getting right


@pytest.mark.parametrize("bad", [{"flow_matching_ratio": 0.8, "consistency_ratio": 0.3}, {"jvp": "forward"},
                                 {"adaptive_c": 0.0}, {"p_std": -1.0}, {"fd_step": 0.5}, {"start_ratio": 1.5}])
def test_bad_meanflow_settings_are_refused_in_one_line(bad: dict) -> None:
    with pytest.raises(ConfigError, match="meanflow"):
        make_config("meanflow", args=bad)


def test_a_lora_flow_map_student_is_refused(tiny_dirs: dict[str, str]) -> None:
    from distill_diffusion.assembly import assemble

    cfg = make_config("meanflow", tiny_dirs["sd15"], model={"student_lora_rank": 4},
                      data={"prompts": ["a red car"], "real": "digits"})
    with pytest.raises(ConfigError, match="full-weight student"):
        assemble(cfg, train=False)
