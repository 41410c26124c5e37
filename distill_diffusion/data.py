"""The data of a run: each step a `Batch` of conditioning and the noise its student starts from (and real samples
with their conditioning when the method needs them); prompt files and image folders are read here.

Sources are seeded through the generator the trainer passes in, so a resumed run draws the same batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import draws
from .config import DataConfig
from .denoiser import Cond
from .errors import ConfigError
from .latents import encode
from .roles import Batch, Models
from .zoo.digits_data import digits_split, prompt_for, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class MixtureData:
    """Uniform random classes of the mixture; ``real`` holds true mixture samples of those classes."""

    has_real = True

    def __init__(self, models: Models):
        self.mixture = models.mixture

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = draws.randint(0, self.mixture.classes, n, generator)
        noise = draws.randn((n, self.mixture.dim), generator)
        real = self.mixture.sample(labels, generator)
        cond = Cond(labels=labels, uncond=Cond(labels=torch.full_like(labels, -1)))
        return Batch(cond, noise, real, cond)


class PromptData:
    """Prompts drawn uniformly from a fixed list whose embeddings are computed once (text encoders are frozen).

    With ``real`` (latents, and for each the index of its caption in ``real_prompts``), batches also carry real
    latents drawn uniformly with their captions' conditioning.
    """

    def __init__(self, models: Models, prompts: list[str], device: torch.device | str,
                 real: tuple[Tensor, list[str]] | None = None):
        self.cond = models.text.encode(prompts).to(device)
        self.prompts = prompts
        self.shape = models.sample_shape
        self.real = None
        if real is not None:
            latents, captions = real
            unique = sorted(set(captions))
            self.real = latents.to(device)
            self.real_cond = models.text.encode(unique).to(device)
            self.real_caption = torch.tensor([unique.index(c) for c in captions], device=device)

    @property
    def has_real(self) -> bool:
        return self.real is not None

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        idx = draws.randint(0, len(self.prompts), n, generator)
        noise = draws.randn((n, *self.shape), generator)
        batch = Batch(self.cond[idx.to(self.cond.embeds.device)], noise)
        if self.real is not None:
            j = draws.randint(0, len(self.real), n, generator).to(self.real.device)
            batch.real, batch.real_cond = self.real[j], self.real_cond[self.real_caption[j]]
        return batch


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-blank line (stripped); a missing file is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(cfg: DataConfig) -> list[str]:
    prompts = list(cfg.prompts) if cfg.prompt_file is None else read_prompt_file(cfg.prompt_file)
    if not prompts:
        raise ConfigError("no prompts: data.prompts is empty or data.prompt_file has no non-blank line")
    return prompts


def real_latents(models: Models, spec: str) -> tuple[Tensor, list[str]]:
    """Real images as the teacher's latents, with a caption each: ``digits`` (the embedded teacher's training split,
    captioned by class) or a folder of images (caption from a same-named .txt beside each image, else empty)."""
    if spec == "digits":
        images, labels = digits_split(models.vae.config.sample_size)["train"]  # the teacher's image size
        images = to_rgb(images)
        captions = [prompt_for(int(k)) for k in labels]
    else:
        images, captions = read_image_folder(Path(spec), models.vae)
    return encode(models, images), captions


def image_files(folder: Path) -> list[Path]:
    """The images of a folder (.png/.jpg/.jpeg/.webp, any case), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(folder: Path, vae: torch.nn.Module) -> tuple[Tensor, list[str]]:
    if not folder.is_dir():
        raise ConfigError(f"data.real {str(folder)!r} is neither `digits` nor an image folder")
    files = image_files(folder)
    if not files:
        raise ConfigError(f"data.real {str(folder)!r} holds no .png/.jpg/.jpeg/.webp image")
    size = vae.config.sample_size
    images, captions = [], []
    for f in files:
        try:
            img = Image.open(f)
            img.load()
        except (OSError, SyntaxError) as e:  # PIL's ways of saying "not an image I can decode"
            raise ConfigError(f"data.real image {str(f)!r} cannot be read ({type(e).__name__}); remove or replace "
                              "it (allowed: readable .png/.jpg/.jpeg/.webp files)") from None
        if img.width != img.height or img.width < 8:
            raise ConfigError(f"data.real image {str(f)!r} is {img.width}x{img.height}; images must be square, at "
                              f"least 8x8 (each is resized to the teacher's {size}x{size}); crop it first")
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        caption = f.with_suffix(".txt")
        try:
            captions.append(caption.read_text(encoding="utf-8").strip() if caption.is_file() else "")
        except UnicodeDecodeError:
            raise ConfigError(f"caption file {str(caption)!r} is not UTF-8 text; save it as UTF-8") from None
    return torch.stack(images), captions


def build_data(models: Models, cfg: DataConfig, device: torch.device | str) -> MixtureData | PromptData:
    if models.family == "gmm":
        if cfg.prompt_file is not None:
            raise ConfigError(f"data.prompt_file {cfg.prompt_file!r} is set, but the mixture teacher (gmm) is "
                              "conditioned on class labels, not prompts; remove it")
        return MixtureData(models)
    real = real_latents(models, cfg.real) if cfg.real is not None else None
    return PromptData(models, read_prompts(cfg), device, real)
