"""The three roles every method works with, what a method needs of them, and what it receives each step.

- `Teacher`: the frozen pretrained denoiser with classifier-free guidance, ``teacher.x0(x_t, t, cond, cfg_scale)``.
- `Student`: a trainable denoiser used as a K-step generator on a fixed timestep list (``[999]`` or
  ``[999, 749, 499, 249]``): predict x0, re-noise it to the next timestep (as DMD2 trains and LCMScheduler samples),
  or deterministic DDIM on the list (progressive distillation).
- critic: a trainable `Denoiser` of the student's own distribution, initialised from the teacher (or the teacher's
  own frozen network, when only heads on its features train).

`Models` bundles them with the noise process and what the family needs around the networks (text conditioning, VAE,
the mixture); `distill_diffusion.factory.build_models` builds them, complete, from a `ModelConfig` and the method's
`Needs`. A `Batch` is what the data gives a method each step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser, cfg_x0
from .gmm import GaussianMixture
from .process import NoiseProcess
from .sampling import ddim, flow_map, multistep, multistep_outputs, renoised, timestep_batch

SAMPLERS = ("multistep", "ddim", "flowmap")
CRITICS = ("copy", "lora", "teacher")


@dataclass(frozen=True)
class Needs:
    """What a method needs from assembly, declared once (``Method.needs(cfg)``) and read by the factory.

    critic: None (no critic), ``copy`` (a trainable full copy of the teacher's network), ``lora`` (a LoRA adapter
        of rank ``critic_lora_rank`` on the teacher's own network) or ``teacher`` (the teacher's frozen network
        itself: heads on its features train). ``model.critic_lora_rank`` overrides the kind: 0 a copy, r a LoRA.
    student_sampler: how the student samples and exports: ``multistep`` (LCMScheduler), ``ddim`` (DDIMScheduler) or
        ``flowmap`` (a flow-map student, whose network reads where each step ends: `distill_diffusion.two_time`;
        DDIM moves between the timesteps).
    student_reads_cfg: whether the method can train a student that reads its CFG scale (``model.cfg_embedding_dim``);
        ``student_cfg`` is then the scale it samples, evaluates and exports at by default.
    real_images: what real images are for (named in the error when ``data.real`` is missing); None: data-free.
    copies_student: the method keeps a copy of the student (a target network), which a sharded student cannot give.
    """

    critic: str | None = None
    critic_lora_rank: int = 0
    student_sampler: str = "multistep"
    student_reads_cfg: bool = False
    student_cfg: float = 1.0
    real_images: str | None = None
    copies_student: bool = False

    def __post_init__(self) -> None:
        if self.critic is not None and self.critic not in CRITICS:
            raise ValueError(f"unknown critic kind {self.critic!r}; choose one of: {', '.join(CRITICS)}")
        if self.critic == "lora" and self.critic_lora_rank < 1:
            raise ValueError(f"a LoRA critic needs a rank >= 1, got {self.critic_lora_rank}")
        if self.student_sampler not in SAMPLERS:
            raise ValueError(f"unknown student sampler {self.student_sampler!r}; choose one of: {', '.join(SAMPLERS)}")

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles the method trains."""
        return ("student", "critic") if self.critic is not None else ("student",)


class Teacher(nn.Module):
    """Frozen denoiser; never receives gradients and never changes."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser.requires_grad_(False).eval()

    def x0(self, x_t: Tensor, t: Tensor, cond: Cond, cfg_scale: float | Tensor = 1.0) -> Tensor:
        return cfg_x0(self.denoiser, x_t, t, cond, cfg_scale)

    def train(self, mode: bool = True) -> Teacher:  # stays in eval mode (no dropout) whatever the trainer asks
        return super().train(False)


class Student(nn.Module):
    """A K-step generator: ``sample(noise, cond)`` runs the fixed timestep list; ``forward`` is one evaluation.

    ``sampler``: ``multistep`` (predict x0, re-noise with fresh noise: DMD2, LCM; exported with LCMScheduler),
    ``ddim`` (deterministic DDIM on the list: progressive distillation; exported with a trailing DDIMScheduler) or
    ``flowmap`` (DDIM moves, each prediction told where its step ends: a flow-map student, MeanFlow).
    ``cfg_scale``: for a student that reads its CFG scale (``model.cfg_embedding_dim``), the scale it samples at
    when ``cond.cfg_scale`` gives none; None for a student whose guidance is baked into its weights.
    """

    def __init__(self, denoiser: Denoiser, timesteps: list[float], sampler: str = "multistep",
                 cfg_scale: float | None = None):
        super().__init__()
        denoiser.process.check_timesteps(list(timesteps))
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown student sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        self.denoiser = denoiser
        self.timesteps = list(timesteps)
        self.sampler = sampler
        self.cfg_scale = cfg_scale

    @property
    def process(self) -> NoiseProcess:
        return self.denoiser.process

    @property
    def reads_cfg(self) -> bool:
        """Whether the student reads its CFG scale (w-conditioned, as LCM's students are)."""
        return self.cfg_scale is not None

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self.reads_cfg and cond.cfg_scale is None:
            cond = replace(cond, cfg_scale=torch.full((len(x_t),), float(self.cfg_scale), device=x_t.device))
        return self.denoiser(x_t, t, cond)

    def x0_to(self, x_t: Tensor, t: Tensor, end: Tensor, cond: Cond) -> Tensor:
        """A flow-map student's x0 prediction for the step from ``t`` to ``end`` (the DDIM move between them is its
        flow map)."""
        return self(x_t, t, replace(cond, end_timestep=end))

    def sample(self, noise: Tensor, cond: Cond, generator: torch.Generator | list[torch.Generator]) -> Tensor:
        """K steps from ``noise``; the re-noising draws from ``generator`` (one per image, as diffusers takes them).

        Where the network's own pipeline does not hand its generators to the scheduler (SD3's and Flux's pipelines
        call ``scheduler.step`` without one, so re-noising draws from torch's global generator), each image's
        re-noising draws from a fresh generator with its own seed instead: what that pipeline draws when called for
        that image alone after ``torch.manual_seed(seed)``.
        """
        if self.sampler == "ddim":
            return ddim(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process)
        if self.sampler == "flowmap":
            return flow_map(lambda x, t, end: self.x0_to(x, t, end, cond), noise, self.timesteps, self.process)
        return multistep(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process,
                         self._renoise_generator(generator), self.denoiser.noise)

    def step_outputs(self, noise: Tensor, cond: Cond, generator: torch.Generator | list[torch.Generator]
                     ) -> list[Tensor]:
        """Every step's x0 prediction of the re-noising sampler, with `sample`'s draws (the last entry is its
        sample): each step's output distribution, which a trajectory-aware method matches step by step."""
        if self.sampler != "multistep":
            raise ValueError(f"step outputs follow the re-noising (multistep) sampler; this student's: {self.sampler}")
        return multistep_outputs(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process,
                                 self._renoise_generator(generator), self.denoiser.noise)

    def _renoise_generator(self, generator: torch.Generator | list[torch.Generator]
                           ) -> torch.Generator | list[torch.Generator]:
        if isinstance(generator, list) and self.denoiser.renoise_from_global_rng:
            return [torch.Generator(g.device).manual_seed(g.initial_seed()) for g in generator]
        return generator

    def rollout(self, noise: Tensor, cond: Cond, k: int | Tensor, generator: torch.Generator
                ) -> tuple[Tensor, Tensor]:
        """The student's own input at step k of its sampler, and that step's timestep (no gradient).

        DMD2's backward simulation (``sample_backward`` in tianweiy/DMD2 ``main/sd_unified_model.py``): roll the
        student out k steps from pure noise so training sees the inputs inference will see. k = 0 is pure noise.
        ``k`` a (B,) tensor: each row its own step (TDM ``train_tdm_demo.py``'s per-sample ``ind_t``); a row is
        evaluated only while its rollout lasts, so the cost is that of the rows' own steps.
        """
        if isinstance(k, Tensor):
            return self._rollout_rows(noise, cond, k, generator)
        with torch.no_grad():
            if self.sampler == "flowmap":
                x = flow_map(lambda x, t, end: self.x0_to(x, t, end, cond), noise, self.timesteps, self.process, k)
                return x.detach(), timestep_batch(self.timesteps[k], x)
            x = renoised(lambda x, t: self(x, t, cond), noise, self.timesteps, self.process, generator, k,
                         self.denoiser.noise)
        return x.detach(), timestep_batch(self.timesteps[k], x)

    def _rollout_rows(self, noise: Tensor, cond: Cond, k: Tensor, generator: torch.Generator
                      ) -> tuple[Tensor, Tensor]:
        """`rollout` with a step per row: at each step the rows still rolling out take one more re-noising step."""
        if self.sampler != "multistep":
            raise ValueError(f"a step per row rolls out the re-noising (multistep) sampler; this student's: "
                             f"{self.sampler}")
        k = k.to(noise.device)
        x = noise.clone()
        with torch.no_grad():
            for i in range(int(k.max())):
                rows = k > i
                part_cond = cond[rows]
                part = renoised(lambda x, t, c=part_cond: self(x, t, c), x[rows], self.timesteps[i:i + 2],
                                self.process, generator, 1, self.denoiser.noise)
                x[rows] = part.to(x.dtype)
        t = torch.tensor([float(v) for v in self.timesteps], device=noise.device)[k]
        return x.detach(), t.long() if all(float(v) == int(v) for v in self.timesteps) else t


@dataclass
class Models:
    process: NoiseProcess
    teacher: Teacher
    student: Student
    critic: Denoiser | None
    family: str  # "gmm" | "sd" | "sdxl" | "sd3" | "flux"
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

    def frozen(self) -> list[nn.Module]:
        """The frozen modules that are not part of a trainable role: teacher, VAE, text encoders."""
        text = list(self.text.encoders) if self.text is not None else []
        return [m for m in (self.teacher, self.vae, *text) if m is not None]


@dataclass
class Batch:
    cond: Cond
    noise: Tensor  # the student's starting noise, shaped like a sample
    real: Tensor | None = None  # real samples (latents for image teachers), for GAN terms; None when data-free
    real_cond: Cond | None = None  # the real samples' own conditioning (their class / caption)
