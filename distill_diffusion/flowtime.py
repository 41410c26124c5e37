"""Straight-line (flow-matching) time on a teacher's own noise process, for flow-map students (MeanFlow, Geng et al.
2025, arXiv:2505.13447).

MeanFlow writes a noisy sample as ``x_s = (1 - s) x0 + s eps``, s in [0, 1], with velocity ``v = eps - x0``. Every
teacher of this package is a Gaussian path ``x_tau = alpha(tau) x0 + sigma(tau) eps``, so a point of flow time s is the
teacher's point of the same noise-to-signal ratio, rescaled:

    s / (1 - s) = sigma(tau) / alpha(tau),        x_tau = k(s) x_s,        k = alpha + sigma

(k = 1 on a flow teacher's path, k = 1 / sqrt((1 - s)^2 + s^2) on a VP path, whose tau is the timestep of log-SNR
2 log((1 - s) / s): `NoiseProcess.timestep_of_log_snr`). An x0 predictor in the teacher's coordinates gives the
velocity ``v(x_s, s) = (x_s - x0) / s``. A flow map's step from s to r < s,

    x_r = x_s - (s - r) u(x_s, r, s),       u = (x_s - x0_hat) / s,

is the deterministic DDIM step from s to r with the prediction x0_hat (`sampling.flow_map`): DDIM is the same move on
every rescaling of a Gaussian path, which is why the student keeps the package's one convention
(``denoiser(x_tau, tau, cond) -> x0``), told the end of its step through ``cond.end_timestep``. Everything here is
differentiable in s, which the MeanFlow identity's derivative in s needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .process import CLEAN, NoiseProcess


class FlowTime:
    """The flow-time map of one `NoiseProcess`."""

    def __init__(self, process: NoiseProcess):
        self.process = process
        if process.kind == "vp":
            ends = torch.tensor([0.0, process.num_train_timesteps - 1], dtype=torch.float64)
            self.s_min, self.s_max = (float(v) for v in self.of_timestep(ends))
        else:  # one training timestep above clean data, and pure noise
            self.s_min, self.s_max = 1.0 / process.num_train_timesteps, 1.0

    def of_timestep(self, tau: Tensor) -> Tensor:
        """Flow time s of the teacher's timesteps ``tau`` (`CLEAN`: 0), float64."""
        tau = torch.as_tensor(tau, dtype=torch.float64)
        alpha, sigma = self.process.alpha_sigma(tau, torch.zeros(len(tau), dtype=torch.float64, device=tau.device))
        return (sigma / (alpha + sigma)).flatten()

    def timestep(self, s: Tensor) -> Tensor:
        """The teacher's timestep tau(s) (float64, fractional on a VP table); s = 0 is `CLEAN`."""
        s = s.double()
        if self.process.kind == "flow":
            tau = self.process.num_train_timesteps * s
        else:
            tau = self.process.timestep_of_log_snr(2 * ((1 - s) / s.clamp_min(1e-12)).log())
        return torch.where(s > 0, tau, torch.full_like(tau, float(CLEAN)))

    def scale(self, s: Tensor) -> Tensor:
        """k(s) with x_tau = k(s) x_s (float64)."""
        s = s.double()
        if self.process.kind == "flow":
            return torch.ones_like(s)
        return 1 / ((1 - s) ** 2 + s**2).sqrt()

    def noised(self, x0: Tensor, eps: Tensor, s: Tensor) -> Tensor:
        """x_s = (1 - s) x0 + s eps."""
        s_ = _bcast(s, x0).to(x0.dtype)
        return (1 - s_) * x0 + s_ * eps

    def x0(self, x0_fn, x: Tensor, s: Tensor) -> Tensor:  # noqa: ANN001
        """An x0 predictor ``x0_fn(x_tau, tau)`` in the teacher's coordinates, called at flow point (x, s)."""
        tau = self.timestep(s).to(x.dtype)
        return x0_fn(_bcast(self.scale(s), x).to(x.dtype) * x, tau).to(x.dtype)

    def velocity(self, x0_fn, x: Tensor, s: Tensor) -> Tensor:  # noqa: ANN001
        """(x - x0) / s at flow point (x, s): the instantaneous velocity of a denoiser, or the average velocity of a
        flow-map student whose ``x0_fn`` already knows the end of its step."""
        return (x - self.x0(x0_fn, x, s)) / _bcast(s, x).to(x.dtype)

    def sample_times(self, n: int, p_mean: float, p_std: float, generator: torch.Generator) -> Tensor:
        """MeanFlow's logit-normal proposal: s = sigmoid(N(p_mean, p_std^2)), clamped to [s_min, s_max] (float64)."""
        from . import draws

        s = torch.sigmoid(p_mean + p_std * draws.randn((n,), generator).double())
        return s.clamp(self.s_min, self.s_max)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
