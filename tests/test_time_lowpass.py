"""The low-passed time input of a continuous-time student (`distill_diffusion.time_lowpass`).

- The frequency of each sinusoidal channel is what diffusers computes (UNet's and the transformers' projections).
- A low-passed network is a stock diffusers network: its weights, loaded into a fresh one with no hook, give the same
  output at fractional timesteps, and training keeps the switched-off columns at zero.
- On the embedded digits UNet it does what it is for: the derivative in the timestep shrinks by more than half while
  the output moves by under 1%.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_config

from distill_diffusion.errors import ConfigError
from distill_diffusion.factory import build_models
from distill_diffusion.roles import Needs
from distill_diffusion.time_lowpass import frequencies, lowpass_time_input


def _net(kind: str):  # noqa: ANN202
    if kind == "sd15":
        from distill_diffusion.tiny import tiny_pipeline

        return tiny_pipeline("sd15").unet
    from distill_diffusion.tiny_flow import tiny_flow_pipeline

    return tiny_flow_pipeline(kind).transformer


def _time_features(net):  # noqa: ANN001, ANN202
    return (net.time_proj, net.time_embedding.linear_1) if hasattr(net, "time_proj") else (
        net.time_text_embed.time_proj, net.time_text_embed.timestep_embedder.linear_1)


@pytest.mark.parametrize("kind", ["sd15", "sd3", "shifted"])
def test_channel_frequencies_are_diffusers_own(kind: str) -> None:
    from diffusers.models.embeddings import Timesteps

    # "shifted": a projection with diffusers' other settings (sin first, frequency shift 1, scale 2)
    proj = Timesteps(32, False, 1, scale=2) if kind == "shifted" else _time_features(_net(kind))[0]
    f = frequencies(proj).float()
    tau = torch.tensor([0.0, 3.7, 250.25, 999.0])
    emb = proj(tau)
    half = proj.num_channels // 2
    phase = tau[:, None] * f[None, :half]
    first, second = (phase.cos(), phase.sin()) if proj.flip_sin_to_cos else (phase.sin(), phase.cos())
    torch.testing.assert_close(emb[:, :half], first, atol=2e-4, rtol=0)
    torch.testing.assert_close(emb[:, half:2 * half], second, atol=2e-4, rtol=0)
    assert float(f.max()) == pytest.approx(proj.scale)


def _call(net, x, tau):  # noqa: ANN001, ANN202
    if hasattr(net, "time_proj"):
        return net(x, tau, encoder_hidden_states=torch.randn(len(x), 4, net.config.cross_attention_dim,
                                                               generator=torch.Generator().manual_seed(1))).sample
    cfg = net.config
    g = torch.Generator().manual_seed(1)
    return net(hidden_states=x, timestep=tau, encoder_hidden_states=torch.randn(len(x), 5, cfg.joint_attention_dim,
                                                                                 generator=g),
               pooled_projections=torch.randn(len(x), cfg.pooled_projection_dim, generator=g)).sample


@pytest.mark.parametrize("kind", ["sd15", "sd3"])
def test_a_lowpassed_network_is_a_stock_network_and_stays_one_through_training(kind: str) -> None:
    net = _net(kind).float()
    stock = copy.deepcopy(net)
    dropped = lowpass_time_input(net, 0.3)
    proj, linear = _time_features(net)
    off = frequencies(proj) > 0.3
    assert dropped == int(off.sum()) > 0
    channels = net.config.in_channels
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    tau = torch.tensor([137.3, 802.6])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        _call(net, x, tau).pow(2).mean().backward()
        opt.step()
    assert linear.weight[:, off].abs().max() == 0  # the switched-off columns stay zero
    assert linear.weight[:, ~off].abs().min() > 0
    stock.load_state_dict(net.state_dict())  # plain diffusers, no hook
    with torch.no_grad():
        torch.testing.assert_close(_call(stock, x, tau), _call(net, x, tau), atol=1e-6, rtol=1e-5)


def test_on_the_digits_unet_the_timestep_derivative_halves_and_the_output_barely_moves() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from distill_diffusion import zoo

    unet = zoo.load("digits").unet.float().eval()
    low = copy.deepcopy(unet)
    lowpass_time_input(low, 0.3)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 32, generator=g) * 0.5
    for level in (100.0, 400.0):
        tau = torch.full((8,), level)
        derivs, outs = [], []
        for net in (unet, low):
            with sdpa_kernel(SDPBackend.MATH):
                out, d = torch.func.jvp(lambda t, n=net: n(x, t, encoder_hidden_states=c).sample, (tau,),
                                        (torch.ones_like(tau),))
            derivs.append(d.norm())
            outs.append(out)
        assert derivs[1] < 0.65 * derivs[0], (level, derivs)
        assert (outs[1] - outs[0]).norm() < 0.01 * outs[0].norm()


def test_config_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match="full-weight student"):
        make_config("consistency", "tiny:sd15", model={"student_lora_rank": 4, "student_time_max_freq": 0.3})
    with pytest.raises(ConfigError, match="> 0"):
        make_config("consistency", "tiny:sd15", model={"student_time_max_freq": -1.0})
    with pytest.raises(ConfigError, match="mlp_smooth"):
        build_models(make_config("scm", model={"student_time_max_freq": 0.3}).model, Needs())
    with pytest.raises(ConfigError, match="does not have"):
        lowpass_time_input(torch.nn.Linear(3, 3), 0.3)


def test_the_factory_lowpasses_the_student_only() -> None:
    cfg = make_config("scm", "tiny:sd15", model={"student_time_max_freq": 0.3})
    models = build_models(cfg.model, Needs())
    student = models.student.denoiser.net
    teacher = models.teacher.denoiser.net
    off = frequencies(student.time_proj) > 0.3
    assert student.time_embedding.linear_1.weight[:, off].abs().max() == 0
    assert teacher.time_embedding.linear_1.weight[:, off].abs().min() > 0


def test_a_flow_map_students_second_time_is_lowpassed_too() -> None:
    """MeanFlow's UNet student reads where its step ends through the UNet's own sinusoidal projection (class
    embedding "timestep"), so that input is low-passed as well."""
    cfg = make_config("meanflow", "tiny:sd15", model={"student_time_max_freq": 0.3})
    from distill_diffusion.methods import METHODS

    student = build_models(cfg.model, METHODS["meanflow"].needs(cfg.method_args)).student.denoiser.net
    off = frequencies(student.time_proj) > 0.3
    for linear in (student.time_embedding.linear_1, student.class_embedding.linear_1):
        assert linear.weight[:, off].abs().max() == 0 and linear._time_lowpass is not None
