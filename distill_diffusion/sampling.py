"""Samplers as pure functions of an x0 predictor, in the style of k-diffusion's ``sampling.py``.

``x0_fn(x_t, t) -> x0_hat`` is any denoiser with its conditioning and CFG scale already bound. Every sampler walks a
descending timestep list from pure noise; the clean end after the last timestep is `process.CLEAN`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .draws import randn
from .process import CLEAN, NoiseProcess

X0Fn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[tuple, "torch.Generator | list[torch.Generator]", Tensor], Tensor]


def timestep_batch(t: float, x: Tensor) -> Tensor:
    """Timestep ``t`` for every row of ``x`` (integer-valued timesteps as long, as diffusers' pipelines pass them)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if float(t) == int(t) else torch.float32)


def ddim(x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess) -> Tensor:
    """Deterministic DDIM (Song et al. 2021, eta = 0) from pure noise through ``timesteps`` to the clean end."""
    x = noise
    for i, t in enumerate(timesteps):
        t_now = timestep_batch(t, x)
        t_next = timestep_batch(timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN, x)
        x = process.ddim_step(x0_fn(x, t_now), x, t_now, t_next)
    return x


def renoised(x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess,
             generator: torch.Generator | list[torch.Generator], k: int, noise_fn: NoiseFn = randn) -> Tensor:
    """The input of step k of the few-step sampler below: k times predict x0, then re-noise it with fresh noise
    (``noise_fn(shape, generator, like)``) to the next timestep. k = 0 is the pure noise itself."""
    x = noise
    for i in range(k):
        x0 = x0_fn(x, timestep_batch(timesteps[i], x))
        x = process.add_noise(x0, noise_fn(x0.shape, generator, x0), timestep_batch(timesteps[i + 1], x))
    return x


def multistep(
    x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess,
    generator: torch.Generator | list[torch.Generator], noise_fn: NoiseFn = randn,
) -> Tensor:
    """Few-step student sampling (DMD2, LCM): predict x0, re-noise it with fresh noise to the next timestep; the
    last prediction is the sample. The first input is pure noise at ``timesteps[0]``, as DMD2 and diffusers'
    ``LCMScheduler`` do."""
    return multistep_outputs(x0_fn, noise, timesteps, process, generator, noise_fn)[-1]


def multistep_outputs(
    x0_fn: X0Fn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess,
    generator: torch.Generator | list[torch.Generator], noise_fn: NoiseFn = randn,
) -> list[Tensor]:
    """Every step's x0 prediction of `multistep`, in order (the same draws; the last is its sample): what a
    trajectory-aware method matches step by step."""
    x, out = noise, []
    for i, t in enumerate(timesteps):
        x0 = x0_fn(x, timestep_batch(t, x))
        out.append(x0)
        if i + 1 < len(timesteps):
            x = process.add_noise(x0, noise_fn(x0.shape, generator, x0), timestep_batch(timesteps[i + 1], x))
    return out


X0EndFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def flow_map(x0_fn: X0EndFn, noise: Tensor, timesteps: Sequence[float], process: NoiseProcess,
             k: int | None = None) -> Tensor:
    """A flow-map student's sampler (MeanFlow): at each step the student predicts x0 knowing where the step ends,
    ``x0_fn(x_t, t, t_next)``, then the deterministic DDIM move to ``t_next``, which on the straight path is MeanFlow's
    ``x_r = x_t - (t - r) u`` (`distill_diffusion.flowtime`). ``k``: stop after k steps (default: all, ending at the
    clean sample)."""
    x = noise
    for i, t in enumerate(timesteps[: len(timesteps) if k is None else k]):
        t_now = timestep_batch(t, x)
        t_next = timestep_batch(timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN, x)
        x = process.ddim_step(x0_fn(x, t_now, t_next), x, t_now, t_next)
    return x
