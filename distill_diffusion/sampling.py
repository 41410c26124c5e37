"""Samplers as pure functions of an x0 predictor, in the style of k-diffusion's ``sampling.py``.

``x0_fn(x_t, t) -> x0_hat`` is any denoiser with its conditioning and guidance already bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import rng
from .process import NoiseProcess

X0Fn = Callable[[Tensor, Tensor], Tensor]


def _t(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if float(t) == int(t) else torch.float32)


def ddim(x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0) from pure noise through ``timesteps`` to the clean end."""
    x = noise
    for i, t in enumerate(timesteps):
        t_now = _t(t, x)
        x0 = x0_fn(x, t_now)
        t_next = _t(timesteps[i + 1], x) if i + 1 < len(timesteps) else None
        x = process.ddim_step(x0, x, t_now, t_next)
    return x


def randn(shape: Sequence[int], generator: torch.Generator | list[torch.Generator], like: Tensor) -> Tensor:
    """Standard normal noise; with a list of generators, row i is drawn from generator i (as diffusers does), so a
    sample does not depend on which batch it was drawn in."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat(rows).to(like.device, like.dtype)
    return rng.randn(shape, generator).to(like.device, like.dtype)


def multistep(
    x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess,
    generator: torch.Generator | list[torch.Generator],
) -> Tensor:
    """Few-step student sampling (DMD2, LCM): predict x0, re-noise it with fresh noise to the next timestep.

    The first input is pure noise at ``timesteps[0]``, as DMD2 and diffusers' ``LCMScheduler`` do.
    """
    x = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        x0 = x0_fn(x, _t(t, x))
        if i + 1 < len(timesteps):
            x = process.add_noise(x0, randn(x0.shape, generator, x0), _t(timesteps[i + 1], x))
    return x0
