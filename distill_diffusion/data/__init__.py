"""The data of a run: each step a `Batch` of conditioning and the noise its student starts from (and real samples
with their conditioning when the method needs them).

Two kinds of feed, chosen by what the config names:

- small data held in memory and drawn uniformly (with replacement) from the run's generator: the mixture's classes,
  a prompt list written in the config (``data.prompts``), the digits teacher's training images (``data.real:
  digits``). These need no preparation step.
- streamed data of any size (`distill_diffusion.data.stream`): ``data.prompt_file`` (prompts encoded each batch, or
  read from ``data.prompt_cache``) and real images from ``data.real`` (decoded, cropped and VAE-encoded each batch)
  or ``data.real_cache`` (latents). Seeded epochs, resumable at the exact row, split between processes.

All draws go through the generator the trainer passes in, so a resumed run draws the same batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import draws
from ..config import DataConfig
from ..denoiser import Cond
from ..errors import ConfigError
from ..latents import encode as to_latents
from ..roles import Batch, Models
from ..zoo.digits_data import digits_split, prompt_for, to_rgb
from .cache import Cache, read_manifest, text_identity, vae_identity
from .images import image_files, open_image_source
from .sources import TextLines, open_text_source
from .stream import Feed, _item

__all__ = ["MixtureData", "PromptData", "build_data", "first_prompts", "image_files", "read_prompt_file",
           "preflight", "read_prompts", "resolution"]


class MixtureData:
    """Random classes of the mixture (by its weights); ``real`` holds true mixture samples of those classes. An
    unconditional mixture task gives every role the null class instead."""

    has_real = True

    def __init__(self, models: Models):
        self.mixture = models.mixture

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        labels = self.mixture.draw_labels(n, generator)
        noise = draws.randn((n, self.mixture.dim), generator)
        real = self.mixture.sample(labels, generator)
        null = torch.full_like(labels, -1)
        if not self.mixture.conditional:  # every role sees the null class; the real samples keep the weights
            labels = null
        cond = Cond(labels=labels, uncond=Cond(labels=null))
        return Batch(cond, noise, real, cond)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------------ prompt feeds
class ListPrompts:
    """A short prompt list: embeddings computed once, prompts drawn uniformly from the run's generator."""

    def __init__(self, models: Models, prompts: list[str], device: torch.device | str):
        self.cond = models.text.encode(prompts).to(device)
        self.count = len(prompts)

    def next(self, n: int, generator: torch.Generator) -> Cond:
        idx = draws.randint(0, self.count, n, generator)
        return self.cond[idx.to(self.cond.embeds.device)]


def _cache_row(cache: Cache, i: int) -> dict[str, Tensor]:
    return cache.row(i)


def _latent_row(cache: Cache, i: int) -> tuple[Tensor, str]:
    return cache.row(i)["latents"], cache.caption(i)


class StreamedPrompts:
    """Prompts of a streamed source, encoded batch by batch (``cache`` None) or read from a prompt cache."""

    def __init__(self, models: Models, source: Any, device: torch.device | str, seed: int, cfg: DataConfig,
                 cached: bool):
        self.text, self.device, self.cached = models.text, device, cached
        self.feed = Feed(source, _cache_row if cached else _item, seed, "prompts", cfg.workers, cfg.prefetch)

    def next(self, n: int, generator: torch.Generator) -> Cond:
        rows = self.feed.next(n, *_shard_of(generator))
        if not self.cached:
            return self.text.encode(rows).to(self.device)
        pooled = rows.get("pooled")
        return self.text.cond(rows["embeds"].to(self.device, torch.float32),
                              None if pooled is None else pooled.to(self.device, torch.float32))


# ------------------------------------------------------------------------------------------------ real feeds
class ListReal:
    """Real latents held in memory (the digits training split), drawn uniformly from the run's generator."""

    def __init__(self, models: Models, latents: Tensor, captions: list[str], device: torch.device | str):
        unique = sorted(set(captions))
        self.latents = latents.to(device)
        self.cond = models.text.encode(unique).to(device)
        self.caption = torch.tensor([unique.index(c) for c in captions], device=device)

    def next(self, n: int, generator: torch.Generator) -> tuple[Tensor, Cond]:
        j = draws.randint(0, len(self.latents), n, generator).to(self.latents.device)
        return self.latents[j], self.cond[self.caption[j]]


class StreamedReal:
    """Real images of a streamed source, VAE-encoded batch by batch (``cached`` False) or latents from a cache."""

    def __init__(self, models: Models, source: Any, device: torch.device | str, seed: int, cfg: DataConfig,
                 cached: bool):
        self.models, self.device, self.cached = models, device, cached
        self.feed = Feed(source, _latent_row if cached else _item, seed, "real", cfg.workers, cfg.prefetch)

    def next(self, n: int, generator: torch.Generator) -> tuple[Tensor, Cond]:
        images, captions = self.feed.next(n, *_shard_of(generator))
        latents = images.to(self.device, torch.float32) if self.cached else to_latents(self.models, images)
        return latents.to(self.device), self.models.text.encode(captions).to(self.device)


def _shard_of(generator: torch.Generator) -> tuple[int, int]:
    return getattr(generator, "rank", 0), getattr(generator, "world", 1)


# ------------------------------------------------------------------------------------------------ the data
class PromptData:
    """Prompt conditioning and noise each step; with a real feed, real latents and their captions' conditioning."""

    def __init__(self, models: Models, prompts: ListPrompts | StreamedPrompts,
                 real: ListReal | StreamedReal | None = None):
        self.prompts, self.real, self.shape = prompts, real, models.sample_shape

    @property
    def has_real(self) -> bool:
        return self.real is not None

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        cond = self.prompts.next(n, generator)  # the order of draws is the same as before streaming existed
        noise = draws.randn((n, *self.shape), generator)
        batch = Batch(cond, noise)
        if self.real is not None:
            batch.real, batch.real_cond = self.real.next(n, generator)
        return batch

    def state_dict(self) -> dict:
        """Streamed feeds' positions (rows consumed by all processes); in-memory feeds live in the generator."""
        return {name: feed.feed.position for name, feed in (("prompts", self.prompts), ("real", self.real))
                if isinstance(feed, (StreamedPrompts, StreamedReal))}

    def load_state_dict(self, state: dict) -> None:
        for name, feed in (("prompts", self.prompts), ("real", self.real)):
            if isinstance(feed, (StreamedPrompts, StreamedReal)):
                feed.feed.load_state(state.get(name, 0))


# ------------------------------------------------------------------------------------------------ reading
def read_prompt_file(path: str | Path) -> list[str]:
    """Every prompt of a text file (one per non-blank line, stripped), in memory: for evaluation prompt lists."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} not found")
    lines = TextLines(path, "prompt file")
    return [lines[i] for i in range(len(lines))]


def read_prompts(cfg: DataConfig) -> list[str]:
    """The prompts of a config's list (``data.prompts``); a prompt file is streamed, never read whole here."""
    if not cfg.prompts:
        raise ConfigError("no prompts: data.prompts is empty or data.prompt_file has no non-blank line")
    return list(cfg.prompts)


def first_prompts(cfg: DataConfig, k: int) -> list[str]:
    """The first ``k`` training prompts (previews, report grids), read without loading the whole source: the prompt
    file's, else the source a prompt cache was made from (when it is still there), else the config's list."""
    spec, column = cfg.prompt_file, cfg.prompt_column
    if spec is None and cfg.prompt_cache is not None:
        source = read_manifest(cfg.prompt_cache, "prompts", "data.prompt_cache")["source"]
        if Path(source["spec"]).exists():
            spec, column = source["spec"], source.get("column")
    if spec is None:
        return read_prompts(cfg)[:k]
    source = open_text_source(spec, column)
    return [source[i] for i in range(min(k, len(source)))]


def resolution(models: Models) -> int:
    """The teacher's image size (its latent size times the VAE's downsampling): real images are cropped to it."""
    return int(models.sample_shape[-1]) * int(models.pipeline.vae_scale_factor)


def _prompt_feed(models: Models, cfg: DataConfig, device: torch.device | str, seed: int):  # noqa: ANN202
    if cfg.prompt_cache is not None:
        cache = Cache(cfg.prompt_cache, "prompts", text_identity(models.text), "data.prompt_cache")
        if cfg.prompt_file is not None and cache.manifest["source"]["spec"] != str(Path(cfg.prompt_file)):
            raise ConfigError(f"data.prompt_cache {cfg.prompt_cache!r} was made from "
                              f"{cache.manifest['source']['spec']!r}, not data.prompt_file {cfg.prompt_file!r}; "
                              "drop data.prompt_file (the cache replaces it) or rebuild the cache")
        return StreamedPrompts(models, cache, device, seed, cfg, cached=True)
    if cfg.prompt_file is not None:
        source = open_text_source(cfg.prompt_file, cfg.prompt_column)
        if not len(source):
            raise ConfigError(f"no prompts: data.prompt_file {cfg.prompt_file!r} has no non-blank line")
        return StreamedPrompts(models, source, device, seed, cfg, cached=False)
    return ListPrompts(models, read_prompts(cfg), device)


def _real_feed(models: Models, cfg: DataConfig, device: torch.device | str, seed: int):  # noqa: ANN202
    if cfg.real_cache is not None:
        cache = Cache(cfg.real_cache, "images", vae_identity(models.vae, resolution(models)), "data.real_cache")
        return StreamedReal(models, cache, device, seed, cfg, cached=True)
    if cfg.real is None:
        return None
    if cfg.real == "digits":
        images, labels = digits_split(resolution(models))["train"]  # the teacher's image size
        latents = to_latents(models, to_rgb(images))
        return ListReal(models, latents, [prompt_for(int(k)) for k in labels], device)
    source = open_image_source(cfg.real, resolution(models), cfg.image_column, cfg.caption_column)
    return StreamedReal(models, source, device, seed, cfg, cached=False)


def preflight(cfg: DataConfig) -> None:
    """What can be checked before the teacher loads (seconds to minutes for SDXL): the named sources exist and the
    caches are finished. Identity and content are checked when the data is built."""
    for key in ("prompt_file", "real"):
        spec = getattr(cfg, key)
        if spec is None or spec == "digits" or spec.startswith("hf:") or any(c in spec for c in "*?["):
            continue
        if not Path(spec).exists():
            raise ConfigError(f"data.{key} {spec!r} not found")
    for key, kind in (("prompt_cache", "prompts"), ("real_cache", "images")):
        if getattr(cfg, key) is not None:
            read_manifest(getattr(cfg, key), kind, f"data.{key}")


def build_data(models: Models, cfg: DataConfig, device: torch.device | str, seed: int = 0
               ) -> MixtureData | PromptData:
    if models.family == "gmm":
        for key in ("prompt_file", "prompt_cache", "real_cache"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"data.{key} {getattr(cfg, key)!r} is set, but the mixture teacher (gmm) is "
                                  "conditioned on class labels, not prompts; remove it")
        return MixtureData(models)
    return PromptData(models, _prompt_feed(models, cfg, device, seed), _real_feed(models, cfg, device, seed))
