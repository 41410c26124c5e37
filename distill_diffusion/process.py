"""The noise process: x_t = alpha(t) * x0 + sigma(t) * eps, built from a diffusers scheduler config.

Two kinds are supported, chosen from the teacher's own scheduler config so that no method ever branches on them:

- ``"vp"``: discrete variance-preserving DDPM processes (SD 1.5 / 2.1 / SDXL). ``alpha = sqrt(alpha_bar[t])`` and
  ``sigma = sqrt(1 - alpha_bar[t])`` with ``alpha_bar`` computed by diffusers' own ``DDPMScheduler`` from the config
  (linear, scaled_linear, squaredcos_cap_v2 betas, trained betas, zero-terminal-SNR rescaling). Timesteps are integers
  in ``[0, T-1]``; note ``alpha_bar(999) ~ 0.0047 > 0`` for SD's schedule.
- ``"flow"``: rectified flow / flow matching (``FlowMatchEulerDiscreteScheduler``: SD3, Flux). ``x_t = (1 - s) x0 + s
  eps`` with ``s = t / T``; timesteps are floats in ``[0, T]`` exactly as those pipelines pass them to the network.

Predictions: ``epsilon``, ``v_prediction`` (v = alpha eps - sigma x0, Salimans & Ho 2022), ``sample`` (x0), and
``flow`` (velocity u = eps - x0, Lipman et al. 2023). All conversions go through x0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import draws

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
KINDS = ("vp", "flow")
CLEAN = -1  # the timestep of clean data, after a sampler's last step: alpha = 1, sigma = 0 for every kind


class NoiseProcess:
    """alpha(t), sigma(t), add_noise, prediction conversions and timestep sampling for one teacher."""

    def __init__(
        self,
        kind: str = "vp",
        prediction_type: str = "epsilon",
        alphas_cumprod: Tensor | None = None,
        num_train_timesteps: int = 1000,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown noise process kind {kind!r}; choose one of: {', '.join(KINDS)}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}"
            )
        if (kind == "flow") != (prediction_type == "flow"):
            raise ValueError(f"prediction_type {prediction_type!r} does not fit a {kind!r} process")
        if kind == "vp" and (alphas_cumprod is None or alphas_cumprod.ndim != 1):
            raise ValueError("a 'vp' process needs a 1-D alphas_cumprod tensor")
        self.kind = kind
        self.prediction_type = prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double().cpu()
        if self.alphas_cumprod is not None and len(self.alphas_cumprod) != self.num_train_timesteps:
            raise ValueError("alphas_cumprod length must equal num_train_timesteps")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> NoiseProcess:
        """Build from a diffusers scheduler config dict (what ``scheduler_config.json`` holds)."""
        from diffusers import DDPMScheduler

        config = dict(config)
        name = config.get("_class_name", "")
        if name.startswith("FlowMatch") or config.get("use_flow_sigmas") or \
                config.get("prediction_type") == "flow_prediction":  # SANA's DPM-Solver on flow sigmas
            # `shift` only respaces the inference sigmas; the training process is the same straight line.
            return cls("flow", "flow", None, config.get("num_train_timesteps", 1000))
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unknown prediction_type {prediction_type!r} in scheduler config; "
                "choose one of: epsilon, v_prediction, sample"
            )
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if k in config})
        if prediction_type == "epsilon" and float(ddpm.alphas_cumprod[-1]) == 0.0:
            # rescale_betas_zero_snr makes alpha_bar exactly 0 at t = T-1, where x0 = (x_t - sigma eps) / alpha
            raise ValueError("a zero-terminal-SNR schedule (rescale_betas_zero_snr) with epsilon prediction has no "
                             "x0 at the last timestep (alpha = 0); use a v_prediction teacher, as the schedule's "
                             "paper does, or one without rescale_betas_zero_snr")
        return cls("vp", prediction_type, ddpm.alphas_cumprod, ddpm.config.num_train_timesteps)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseProcess:
        return cls.from_scheduler_config(dict(scheduler.config, _class_name=type(scheduler).__name__))

    # ---------------------------------------------------------------- schedule
    def alpha_sigma(self, t: Tensor | float | int, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha(t), sigma(t) shaped to broadcast against ``like`` (batch first), in ``like``'s dtype (>= fp32).
        ``t`` may be `CLEAN` (per sample): alpha 1, sigma 0."""
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if self.kind == "vp":
            abar = self.alpha_bar(t)
            abar = torch.where(t == CLEAN, torch.ones_like(abar), abar)
            alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        else:
            sigma = (t.double() / self.num_train_timesteps).clamp_min(0)
            alpha = 1 - sigma
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.to(dtype).reshape(shape), sigma.to(dtype).reshape(shape)

    def alpha_bar(self, t: Tensor) -> Tensor:
        """A 'vp' process's alpha_bar at timesteps ``t`` (float64): the table's value at an integer, and between two
        integers the log-SNR interpolated linearly, so continuous-time methods (sCM's tangent through the network's
        time input) see a schedule that is continuous and differentiable in t (forward and reverse mode)."""
        table = self.alphas_cumprod.to(t.device)
        log_snr = (table / (1 - table)).log()
        t = t.double()  # past either end the end segment's slope carries on, so a derivative there exists
        lo = t.detach().floor().clamp(0, len(table) - 2).long()
        frac = t - lo
        return torch.sigmoid(log_snr[lo] + frac * (log_snr[lo + 1] - log_snr[lo]))

    def timestep_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """The inverse of `alpha_bar`'s log-SNR for a 'vp' process: the (fractional) timestep whose interpolated
        log-SNR is ``log_snr`` (float64); differentiable in ``log_snr``."""
        table = self.alphas_cumprod.to(log_snr.device)
        desc = -(table / (1 - table)).log()  # ascending in t
        target = -log_snr.double()  # past either end: the end segment extended, as `alpha_bar` extends it
        hi = torch.searchsorted(desc, target.detach()).clamp(1, len(desc) - 1)
        lo = hi - 1
        return lo.double() + (target - desc[lo]) / (desc[hi] - desc[lo])

    def snr(self, t: Tensor) -> Tensor:
        """alpha(t)^2 / sigma(t)^2 per sample, (B,) in fp32."""
        alpha, sigma = self.alpha_sigma(t, torch.zeros(len(t), device=t.device))
        return (alpha / sigma) ** 2

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return (alpha * x0 + sigma * eps).to(x0.dtype)

    # ---------------------------------------------------------------- conversions (all through x0)
    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str | None = None) -> Tensor:
        """x0 from a network output of the given (default: the process's) prediction type."""
        kind = prediction_type or self.prediction_type
        pred, x_t = _upcast(pred), _upcast(x_t)
        alpha, sigma = self.alpha_sigma(t, x_t)
        if kind == "sample":
            return pred
        if kind == "epsilon":
            return (x_t - sigma * pred) / alpha
        if kind == "v_prediction":  # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
            return alpha * x_t - sigma * pred
        if kind == "flow":  # u = eps - x0, x_t = (1 - s) x0 + s eps
            return x_t - sigma * pred
        raise ValueError(f"unknown prediction_type {kind!r}; choose one of: {', '.join(PREDICTION_TYPES)}")

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor, target: str) -> Tensor:
        """The quantity ``target`` (epsilon, v_prediction, sample, flow) implied by x0 at (x_t, t)."""
        x0, x_t = _upcast(x0), _upcast(x_t)
        if target == "sample":
            return x0
        alpha, sigma = self.alpha_sigma(t, x_t)
        eps = (x_t - alpha * x0) / sigma
        if target == "epsilon":
            return eps
        if target == "v_prediction":
            return alpha * eps - sigma * x0
        if target == "flow":
            return eps - x0
        raise ValueError(f"unknown target {target!r}; choose one of: {', '.join(PREDICTION_TYPES)}")

    def denoising_loss(self, x0_hat: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, target: str) -> Tensor:
        """Per-sample mean squared error between x0_hat and the true x0, measured in ``target`` space.

        ``epsilon`` weights the x0 error by SNR(t) (DDPM's simple loss), ``v_prediction`` by SNR(t) + 1, ``sample``
        uniformly, ``flow`` by 1/sigma^2. With ``target`` the network's own prediction type this is its native loss.
        """
        diff = self.from_x0(x0_hat, x_t, t, target) - self.from_x0(x0, x_t, t, target)
        return diff.pow(2).flatten(1).mean(1)

    def x0_to_eps(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.from_x0(x0, x_t, t, "epsilon")

    def ddim_step(self, x0: Tensor, x_t: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """Deterministic DDIM (eta = 0) move from t to t_next given x0, per sample; where ``t_next`` is `CLEAN` the
        result is x0 itself."""
        eps = self.x0_to_eps(x0, x_t, t)
        return self.add_noise(x0, eps, t_next)

    # ---------------------------------------------------------------- timesteps
    def timestep(self, frac: float) -> float:
        """A fraction of the way through training time, in this process's timestep units (e.g. 0.98 -> 980)."""
        return frac * self.num_train_timesteps

    def sample_timesteps(
        self, n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device | str | None = None,
        shift: float = 1.0,
    ) -> Tensor:
        """n timesteps uniform over the fractions [lo, hi] of training time.

        'vp': integers ``int(lo*T) .. min(int(hi*T), T-1)`` inclusive (DMD2's ``randint(min_step, max_step + 1)``);
        'flow': floats ``u T`` with u uniform in ``[lo, hi]``, then, with ``shift`` s != 1, mapped through
        ``s u / (1 + (s - 1) u)`` (SD3's timestep shift; NVlabs/FastGen's "shifted" density): s > 1 moves mass to
        higher noise.
        """
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"timestep range [{lo}, {hi}] must satisfy 0 <= lo <= hi <= 1")
        if shift != 1.0 and self.kind != "flow":
            raise ValueError(f"a timestep shift ({shift}) is for flow-matching teachers; this one is {self.kind!r}")
        device = device if device is not None else generator.device
        T = self.num_train_timesteps
        if self.kind == "vp":
            a, b = int(lo * T), min(int(hi * T), T - 1)
            return draws.randint(a, b + 1, n, generator).to(device)
        u = lo + (hi - lo) * draws.rand(n, generator).to(device)
        if shift != 1.0:
            u = shift * u / (1 + (shift - 1) * u)
        return u * T

    def first_timestep(self) -> float:
        return self.num_train_timesteps - 1 if self.kind == "vp" else float(self.num_train_timesteps)

    def trailing_timesteps(self, num_steps: int) -> list[float]:
        """Evenly spaced timesteps ending at the noisiest one (diffusers' ``timestep_spacing="trailing"``)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        if self.kind == "vp":
            return [int(round(T - i * T / num_steps)) - 1 for i in range(num_steps)]
        return [T - i * T / num_steps for i in range(num_steps)]

    def check_timesteps(self, timesteps: list[float]) -> None:
        """A student's timestep list: non-empty, strictly descending, inside the process's range."""
        hi = self.first_timestep()
        if not timesteps:
            raise ValueError("timesteps must be a non-empty list, for example [999] or [999, 749, 499, 249]")
        if any(not 0 <= t <= hi for t in timesteps):
            raise ValueError(f"timesteps {list(timesteps)} out of range; each must lie in [0, {hi:g}]")
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps {list(timesteps)} must be strictly descending, e.g. [999, 749, 499, 249]")
        if self.kind == "vp" and any(float(t) != int(t) for t in timesteps):
            raise ValueError(f"timesteps {list(timesteps)} must be integers for a discrete (vp) process")


def _upcast(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
