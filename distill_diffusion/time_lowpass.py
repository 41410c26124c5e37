"""A student whose time input is smooth: the highest frequencies of its sinusoidal timestep features switched off.

Every diffusers network here reads its timestep (0 .. 1000) through sinusoids ``sin(f_k tau), cos(f_k tau)`` with
f_k = 10000^(-k / half) rad per timestep, up to 1 rad per timestep, and was trained at integer timesteps only. The
continuous-time methods (sCM, rCM, MeanFlow) differentiate the student in its time input, through a map whose slope
is hundreds of timesteps per unit of their own time (TrigFlow's t, MeanFlow's s), so the tangent is dominated by the
highest-frequency features: measured on the embedded digits UNet (``python bench/time_input.py``), the exact
derivative in tau is 2-4x the secant over +-10 timesteps, and switching off the three highest frequencies (1, 0.56
and 0.32 rad per timestep, 6 of 32 channels) brings it to the secant while moving the output by 0.1-0.4%; the flow
teacher's transformer alike (2x, 0.2-0.6%; ``docs/BENCHMARKS.md``). The student then learns to chase its own
high-frequency wiggle in t and the target grows without bound (the digits sCM / MeanFlow cells diverged).

sCM (Lu & Song 2025, Sec. 4.1) and SANA-Sprint (Chen et al. 2025, Sec. 3.2, "dense time embedding"; NVlabs/Sana's
``scheduler.timestep_norm_scale_factor``) meet the same failure and remove it by feeding the network c_noise(t) = t
instead of 1000 t, which needs the teacher fine-tuned to the new time scale first. This module does the cheaper thing
that keeps the network a stock diffusers one: the input channels of the time MLP's first layer whose frequency is
above ``max_freq`` are zeroed (their weight columns set to zero and their inputs masked, so they stay zero through
training and the exported weights compute the same function in plain diffusers). The student starts a hair away
from the teacher (under 0.6% at 0.3 on both digits teachers) and the distillation loss corrects the rest. A
full-weight student only: a LoRA student shares the teacher's base weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# (sinusoidal projection, the linear layer that reads it), relative to the network, for each family
_PAIRS = (
    ("time_proj", "time_embedding.linear_1"),  # UNet2DConditionModel
    ("time_proj", "class_embedding.linear_1"),  # a flow-map UNet's second time (class_embed_type "timestep")
    ("time_text_embed.time_proj", "time_text_embed.timestep_embedder.linear_1"),  # SD3 / Flux / Qwen-Image
    ("time_text_embed.end_time_proj", "time_text_embed.end_time_embed.linear_1"),  # a flow-map transformer's second
    ("time_embed.emb.time_proj", "time_embed.emb.timestep_embedder.linear_1"),  # SANA (AdaLayerNormSingle)
    ("time_embed.time_proj", "time_embed.timestep_embedder.linear_1"),  # SANA-Sprint's guidance embedding
)


def frequencies(proj: nn.Module) -> torch.Tensor:
    """Each output channel's frequency in rad per timestep, for a diffusers ``Timesteps`` projection."""
    half = proj.num_channels // 2
    k = torch.arange(half, dtype=torch.float64)
    f = proj.scale * torch.exp(-math.log(10000) * k / (half - proj.downscale_freq_shift))
    out = torch.cat([f, f])  # [sin, cos] or [cos, sin]: channel j has frequency index j mod half
    if proj.num_channels % 2:
        out = torch.cat([out, out.new_zeros(1)])  # the zero pad
    return out


def _get(net: nn.Module, path: str) -> Any:
    for name in path.split("."):
        net = getattr(net, name, None)
        if net is None:
            return None
    return net


def _mask_input(mask: torch.Tensor):  # noqa: ANN202
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.to(args[0]),) + args[1:]

    return hook


def lowpass_time_input(net: nn.Module, max_freq: float) -> int:
    """Switch off every timestep feature above ``max_freq`` rad per timestep in ``net`` (in place); returns how many
    input channels were switched off. Raises a one-line `ConfigError` when ``net`` has no sinusoidal time input."""
    if not max_freq > 0:
        raise ConfigError(f"model.student_time_max_freq must be > 0 rad per timestep (or null), got {max_freq}")
    found, dropped = 0, 0
    for proj_path, linear_path in _PAIRS:
        proj, linear = _get(net, proj_path), _get(net, linear_path)
        if proj is None or not isinstance(linear, nn.Linear) or not hasattr(proj, "num_channels"):
            continue
        if getattr(linear, "_time_lowpass", None) is not None:
            raise ConfigError(f"{type(net).__name__}.{linear_path} is already low-passed")
        keep = (frequencies(proj) <= max_freq).to(linear.weight.dtype)
        with torch.no_grad():
            linear.weight.mul_(keep.to(linear.weight.device))
        linear.register_forward_pre_hook(_mask_input(keep))
        linear._time_lowpass = keep
        found += 1
        dropped += int((keep == 0).sum())
    if not found:
        raise ConfigError(f"model.student_time_max_freq low-passes a diffusers network's sinusoidal time input, "
                          f"which {type(net).__name__} does not have; supported: UNet2DConditionModel, SD3 / Flux / "
                          f"SANA / Qwen-Image transformers (the mixture MLP: model.mlp_smooth)")
    return dropped
