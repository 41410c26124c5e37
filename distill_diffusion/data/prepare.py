"""``distill-diffusion data encode-prompts`` / ``encode-images`` / ``verify``: build the on-disk caches a training run
then reads (`distill_diffusion.data.cache`), with the teacher's own frozen text encoders and VAE.

The teacher comes from the config (``model.teacher``), the source from its ``data`` section (``prompt_file`` /
``real``), so the run that later names the cache has the same teacher, and the cache's identity check passes.
Prompts are encoded in order, ``batch`` at a time; images are decoded, resized and cropped by DataLoader workers and
encoded by the VAE in batches. A killed build is resumed by rerunning the same command.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..config import Config
from ..errors import ConfigError
from ..factory import image_size, text_conditioner
from ..latents import encode_vae, latent_channels
from ..teachers import load_pipeline
from .cache import CacheWriter, text_identity, vae_identity
from .images import open_image_source
from .sources import open_text_source
from .stream import _collate, _item, _Items

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SHARD_BYTES = 128 << 20  # rows per shard: about this many bytes


def _no_mixture(cfg: Config) -> None:
    if cfg.model.teacher == "gmm":
        raise ConfigError("the mixture teacher (gmm) has no text encoder or VAE: there is nothing to cache")


def _teacher(cfg: Config, device: str, pipeline: Any = None):  # noqa: ANN202
    pipe = pipeline if pipeline is not None else load_pipeline(cfg.model.teacher)
    text = text_conditioner(pipe)
    for module in (pipe.vae, *text.encoders):
        module.to(device)
    return pipe, text


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not one of: {', '.join(DTYPES)}")
    return DTYPES[name]


class _Progress:
    """``done/total rows, rate/s`` on stderr, at most every 5 seconds and at the end."""

    def __init__(self, total: int):
        self.total, self.start, self.last = total, time.time(), 0.0

    def __call__(self, done: int) -> None:
        now = time.time()
        if now - self.last >= 5 or done >= self.total:
            self.last = now
            print(f"{done}/{self.total} rows, {done / max(now - self.start, 1e-9):.0f}/s", file=sys.stderr, flush=True)


def encode_prompts(cfg: Config, out: str | Path, batch: int = 256, dtype: str = "float16",
                   device: str = "cpu") -> Path:
    _no_mixture(cfg)
    if cfg.data.prompt_file is None:
        raise ConfigError("data.prompt_file is not set: name the prompts to encode (a .txt, .jsonl, .csv, .tsv, "
                          ".parquet, .tar shards, a `datasets` folder or hf:NAME)")
    source = open_text_source(cfg.data.prompt_file, cfg.data.prompt_column)
    if not len(source):
        raise ConfigError(f"no prompts: data.prompt_file {cfg.data.prompt_file!r} has no non-blank line")
    _, text = _teacher(cfg, device)
    to = _dtype(dtype)
    probe, probe_pooled = text._encode([source[0]])
    row_bytes = (probe.numel() + (0 if probe_pooled is None else probe_pooled.numel())) * to.itemsize
    writer = CacheWriter(Path(out), "prompts", text_identity(text),
                         {"spec": str(Path(cfg.data.prompt_file)), "column": cfg.data.prompt_column,
                          "count": len(source)}, shard_rows=max(1, SHARD_BYTES // max(row_bytes, 1)))
    progress = _Progress(len(source))
    for lo in range(writer.done_rows, len(source), batch):
        prompts = [source[i] for i in range(lo, min(lo + batch, len(source)))]
        embeds, pooled = text._encode(prompts)
        rows = {"embeds": embeds.to("cpu", to)}
        if pooled is not None:
            rows["pooled"] = pooled.to("cpu", to)
        writer.add(rows)
        progress(lo + len(prompts))
    return writer.finish()


def encode_images(cfg: Config, out: str | Path, batch: int = 64, dtype: str = "float16", device: str = "cpu",
                  workers: int | None = None, pipeline: Any = None) -> Path:
    """``pipeline``: the teacher already in memory (benchmarks), instead of loading ``model.teacher``."""
    _no_mixture(cfg)
    if cfg.data.real in (None, "digits"):
        raise ConfigError("data.real must name the images to encode (an image folder, .tar shards, .parquet, a "
                          "`datasets` folder or hf:NAME); `digits` needs no cache")
    pipe, _ = _teacher(cfg, device, pipeline)
    size = image_size(pipe)
    source = open_image_source(cfg.data.real, size, cfg.data.image_column, cfg.data.caption_column, check=False)
    to = _dtype(dtype)
    shape = (latent_channels(pipe.vae), size // int(pipe.vae_scale_factor))
    row_bytes = shape[0] * shape[1] ** 2 * to.itemsize
    writer = CacheWriter(Path(out), "images", vae_identity(pipe.vae, size),
                         {"spec": str(cfg.data.real), "count": len(source)},
                         shard_rows=max(1, SHARD_BYTES // row_bytes))
    workers = cfg.data.workers if workers is None else workers
    order = range(writer.done_rows, len(source))
    loader = DataLoader(_Items(source, _item), batch_size=batch, num_workers=workers,
                        collate_fn=_collate, sampler=order)  # in order: row i of the cache is image i of the source
    progress, done = _Progress(len(source)), writer.done_rows
    for item in loader:
        if isinstance(item, ConfigError):
            raise item
        images, captions = item
        writer.add({"latents": encode_vae(pipe.vae, images).to("cpu", to)}, captions)
        done += len(captions)
        progress(done)
    return writer.finish()
