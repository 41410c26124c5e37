"""The three roles every method works with: teacher score, student generator, fake critic.

- `Teacher`: the frozen pretrained denoiser with classifier-free guidance, ``teacher.x0(x_t, t, cond, guidance)``.
- `Student`: a trainable denoiser used as a K-step generator on a fixed timestep list (``[999]`` or
  ``[999, 749, 499, 249]``): predict x0, re-noise it to the next timestep, as DMD2 trains and LCMScheduler samples.
- critic: a trainable `Denoiser` of the student's own distribution, initialised from the teacher.

`Models` bundles them with the noise process and what the family needs around the networks (text conditioning,
VAE, the mixture). Built by `distill_diffusion.models.build_models`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import rng
from .denoiser import Cond, Denoiser, guided_x0
from .gmm import GaussianMixture
from .process import NoiseProcess
from .sampling import ddim, multistep


class Teacher(nn.Module):
    """Frozen denoiser; never receives gradients and never changes."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser.requires_grad_(False).eval()

    def x0(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float = 1.0) -> Tensor:
        return guided_x0(self.denoiser, x_t, t, cond, guidance)

    def train(self, mode: bool = True) -> Teacher:  # stays in eval mode (no dropout) whatever the trainer asks
        return super().train(False)


SAMPLERS = ("multistep", "ddim")


class Student(nn.Module):
    """A K-step generator: ``sample(noise, cond)`` runs the fixed timestep list; ``forward`` is one evaluation.

    ``sampler``: ``multistep`` (predict x0, re-noise with fresh noise: DMD2, LCM; exported with LCMScheduler) or
    ``ddim`` (deterministic DDIM on the list: progressive distillation; exported with a trailing DDIMScheduler). The
    method decides (``Method.student_sampler``).
    """

    def __init__(self, denoiser: Denoiser, timesteps: list[float], sampler: str = "multistep",
                 guidance: float | None = None):
        super().__init__()
        denoiser.process.check_timesteps(list(timesteps))
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown student sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        self.denoiser = denoiser
        self.timesteps = list(timesteps)
        self.sampler = sampler
        self.guidance = guidance

    @property
    def process(self) -> NoiseProcess:
        return self.denoiser.process

    @property
    def w_conditioned(self) -> bool:
        """Whether the student reads its CFG scale (``model.guidance_embedding``); ``guidance`` is then the scale it
        samples at when ``cond.guidance`` gives none. Otherwise the scale it learned is baked in."""
        return self.guidance is not None

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.w_conditioned and cond.guidance is None:
            cond = replace(cond, guidance=torch.full((len(x_t),), float(self.guidance), device=x_t.device))
        return self.denoiser(x_t, t, cond)

    def sample(self, noise: Tensor, cond: Cond, generator: torch.Generator | list[torch.Generator]) -> Tensor:
        if self.sampler == "ddim":
            return ddim(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process)
        return multistep(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process, generator)

    def rollout(self, noise: Tensor, cond: Cond, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The student's own input at step k of its sampler, and that step's timestep (no gradient).

        DMD2's backward simulation (``sample_backward`` in tianweiy/DMD2 ``main/sd_unified_model.py``): roll the
        student out k steps from pure noise so training sees the inputs inference will see. k = 0 is pure noise.
        """
        x = noise
        with torch.no_grad():
            for i in range(k):
                x0 = self(x, torch.full((len(x),), self.timesteps[i], device=x.device), cond)
                eps = rng.randn(x0.shape, generator).to(x0.device, x0.dtype)
                x = self.process.add_noise(x0, eps, torch.full((len(x),), self.timesteps[i + 1], device=x.device))
        t = torch.full((len(x),), self.timesteps[k], device=x.device)
        return x.detach(), t


@dataclass
class Models:
    process: NoiseProcess
    teacher: Teacher
    student: Student
    critic: Denoiser | None
    family: str  # "gmm" | "sd" | "sdxl"
    sample_shape: tuple[int, ...]
    mixture: GaussianMixture | None = None
    text: Any = None  # TextConditioner for prompt-conditioned families
    vae: nn.Module | None = None
    pipeline: Any = None  # the teacher's diffusers pipeline (export reuses its class and components)
    seed: int = 0  # seeds fresh weights a method adds (e.g. a GAN head)

    def trainable(self) -> dict[str, nn.Module]:
        roles: dict[str, nn.Module] = {"student": self.student}
        if self.critic is not None:
            roles["critic"] = self.critic
        return roles
