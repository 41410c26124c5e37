"""What a method receives each step: a `Batch` of conditioning and the noise its student starts from.

Sources are seeded through the generator the trainer passes in, so a resumed run draws the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import ConfigError, DataConfig
from .denoiser import Cond
from .roles import Models


@dataclass
class Batch:
    cond: Cond
    noise: Tensor  # the student's starting noise, shaped like a sample
    real: Tensor | None = None  # real samples, for methods that use data (GAN terms); None when data-free


class MixtureData:
    """Uniform random classes of the mixture; ``real`` holds true mixture samples of those classes."""

    def __init__(self, models: Models):
        self.mixture = models.mixture

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        device = generator.device
        labels = torch.randint(0, self.mixture.classes, (n,), generator=generator, device=device)
        noise = torch.randn(n, self.mixture.dim, generator=generator, device=device)
        real = self.mixture.sample(labels, generator)
        return Batch(Cond(labels=labels, uncond=Cond(labels=torch.full_like(labels, -1))), noise, real)


class PromptData:
    """Prompts drawn uniformly from a fixed list whose embeddings are computed once (text encoders are frozen)."""

    def __init__(self, models: Models, prompts: list[str], device: torch.device | str):
        self.cond = models.text.encode(prompts).to(device)
        self.prompts = prompts
        self.shape = models.sample_shape

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        device = generator.device
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator, device=device)
        noise = torch.randn(n, *self.shape, generator=generator, device=device)
        return Batch(self.cond[idx.to(self.cond.embeds.device)], noise)


def read_prompts(cfg: DataConfig) -> list[str]:
    if cfg.prompt_file is None:
        prompts = list(cfg.prompts)
    else:
        path = Path(cfg.prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt file {str(path)!r} not found")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: data.prompts is empty or data.prompt_file has no non-blank line")
    return prompts


def build_data(models: Models, cfg: DataConfig, device: torch.device | str) -> MixtureData | PromptData:
    if models.family == "gmm":
        return MixtureData(models)
    return PromptData(models, read_prompts(cfg), device)
