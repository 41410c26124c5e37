"""TrigFlow time on a teacher's own noise process (Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", ICLR 2025, arXiv:2410.11081, Sec. 2; SANA-Sprint, Chen et al. 2025, arXiv:2503.09641, Sec. 3.1).

TrigFlow writes a noisy sample as ``x = cos(t) x0 + sin(t) sigma_d eps``, t in [0, pi/2]. Every teacher of this package
is a Gaussian path ``x_tau = alpha(tau) x0 + sigma(tau) eps`` (VP: SD 1.5 / 2.1 / SDXL; flow matching: SD3, Flux,
SANA), so a TrigFlow point is the teacher's point of the same noise-to-signal ratio, rescaled:

    sigma(tau) / alpha(tau) = sigma_d tan(t),        x_tau = c(t) x,       alpha(tau) = c(t) cos(t)

with c(t) = 1 / (cos t + sigma_d sin t) and tau = T sigma_d sin t / (cos t + sigma_d sin t) on the flow path (SANA-
Sprint's training-free transform, Eq. 7-8), and c(t) = 1 / sqrt(cos^2 t + sigma_d^2 sin^2 t) with tau the timestep of
log-SNR -2 log(sigma_d tan t) on a VP path (`NoiseProcess.timestep_of_log_snr`; the discrete table interpolated in
log-SNR). Any denoiser's x0 at (x_tau, tau) is then TrigFlow's x0 at (x, t), and TrigFlow's network output is

    F(x, t) = (cos(t) x - x0) / (sigma_d sin t),       f(x, t) = cos(t) x - sin(t) sigma_d F = x0,
    dx/dt   = sigma_d F  (the probability-flow ODE in TrigFlow time),

so teacher, student and critic keep the package's one convention (``denoiser(x_tau, tau, cond) -> x0``) and only the
continuous-time methods see TrigFlow. Everything here is differentiable in t (forward and reverse mode), which the
tangent through the network's time input needs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .process import NoiseProcess


class TrigFlow:
    """The TrigFlow map of one `NoiseProcess` with data scale ``sigma_data``."""

    def __init__(self, process: NoiseProcess, sigma_data: float):
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.process = process
        self.sigma_data = float(sigma_data)
        if process.kind == "vp":
            abar = process.alphas_cumprod
            ratio = ((1 - abar) / abar).sqrt() / self.sigma_data  # tan t at each table entry
            self.t_min, self.t_max = float(ratio[0].atan()), float(ratio[-1].atan())
        else:  # one training timestep above clean data, and pure noise (s = 1, t = pi/2)
            s = 1.0 / process.num_train_timesteps
            self.t_min, self.t_max = math.atan(s / (1 - s) / self.sigma_data), math.pi / 2

    def of_timestep(self, tau: Tensor) -> Tensor:
        """TrigFlow t of the teacher's timesteps ``tau`` (float64)."""
        alpha, sigma = self.process.alpha_sigma(tau, torch.zeros(len(tau), dtype=torch.float64, device=tau.device))
        return torch.atan2(sigma.flatten(), self.sigma_data * alpha.flatten())

    def timestep(self, t: Tensor) -> Tensor:
        """The teacher's timestep tau(t) (float64, fractional on a VP table)."""
        t = t.double()
        if self.process.kind == "flow":
            sin, cos = t.sin() * self.sigma_data, t.cos()
            return self.process.num_train_timesteps * sin / (cos + sin)
        return self.process.timestep_of_log_snr(-2 * (self.sigma_data * t.tan()).log())

    def scale(self, t: Tensor) -> Tensor:
        """c(t) with x_tau = c(t) x (float64)."""
        t = t.double()
        if self.process.kind == "flow":
            return 1 / (t.cos() + self.sigma_data * t.sin())
        return 1 / (t.cos() ** 2 + (self.sigma_data * t.sin()) ** 2).sqrt()

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x = cos(t) x0 + sin(t) sigma_d eps, ``eps`` standard normal."""
        cos, sin = _bcast(t.cos(), x0), _bcast(t.sin(), x0)
        return (cos * x0 + sin * self.sigma_data * eps).to(x0.dtype)

    def F(self, x0_fn, x: Tensor, t: Tensor) -> Tensor:  # noqa: ANN001, N802 (the paper's name)
        """TrigFlow's F(x, t) from an x0 predictor ``x0_fn(x_tau, tau)`` in the teacher's own coordinates."""
        tau = self.timestep(t).to(x.dtype)
        x0 = x0_fn(_bcast(self.scale(t), x).to(x.dtype) * x, tau).to(x.dtype)
        cos, sin = _bcast(t.cos(), x).to(x.dtype), _bcast(t.sin(), x).to(x.dtype)
        return (cos * x - x0) / (self.sigma_data * sin)

    def sample_times(self, n: int, p_mean: float, p_std: float, generator: torch.Generator) -> Tensor:
        """sCM's proposal: tan(t) = exp(N(p_mean, p_std^2)) / sigma_d, clamped to the process's [t_min, t_max]."""
        from . import draws

        log_ratio = p_mean + p_std * draws.randn((n,), generator)
        t = (log_ratio.double().exp() / self.sigma_data).atan()
        return t.clamp(self.t_min, self.t_max)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))
