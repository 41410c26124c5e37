"""Where teachers come from: a teacher spec -> a diffusers pipeline object, offline unless a hub id is given.

``tiny:<kind>`` (tiny random pipelines built from config, `distill_diffusion.tiny`), ``embedded:<name>`` (the models
shipped in the package, `distill_diffusion.zoo`), a local diffusers pipeline directory, or a hub id (downloaded or
from the local cache). The exact mixture teacher (``gmm``) is no pipeline; `distill_diffusion.factory` builds it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import zoo
from .errors import ConfigError, first_line

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_pipeline(spec: str) -> Any:
    """A diffusers pipeline from ``tiny:<kind>``, ``embedded:<name>``, a local directory or a hub id."""

    if spec.startswith("tiny:"):
        # imported here, not at the top: the tiny pipelines import diffusers' and transformers' pipeline classes,
        # seconds that no run of a real teacher should pay
        from .tiny import tiny_pipeline

        return tiny_pipeline(spec.split(":", 1)[1])
    if spec.startswith(zoo.PREFIX):
        return zoo.load(spec)
    path = Path(spec)
    if not path.is_dir() and HUB_ID.fullmatch(spec):
        return _from_hub(spec)
    if not path.is_dir():
        raise ConfigError(
            f"teacher {spec!r} is not a directory; give gmm, embedded:digits, embedded:digits-flow, tiny:sd15, "
            "tiny:sd21, tiny:sdxl, tiny:sd3, tiny:flux, tiny:sana, tiny:qwen, a diffusers pipeline directory or a "
            "hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"teacher {spec!r} is not a diffusers pipeline directory (no model_index.json)")
    return from_directory(path, "teacher")


def from_directory(path: Path, what: str) -> Any:
    """A diffusers pipeline saved in ``path``; a damaged one is refused in one line naming it as ``what``."""
    from diffusers import DiffusionPipeline

    try:  # a safety checker is never loaded; pipelines without that component are not told about it
        index = json.loads((Path(path) / "model_index.json").read_text())
        extra = {"safety_checker": None} if "safety_checker" in index else {}
        return DiffusionPipeline.from_pretrained(path, local_files_only=True, **extra)
    except Exception as e:  # noqa: BLE001 (a truncated or garbled file: torch, safetensors, json each raise their own)
        raise ConfigError(f"{what} {str(path)!r} could not be loaded ({type(e).__name__}: {first_line(e)[:200]}); "
                          "a file in it is damaged or missing: copy the pipeline again") from None


def _from_hub(repo: str) -> Any:
    """A pipeline by hub id (downloaded or from the local cache; remote code is never trusted)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo, safety_checker=None)
    except (OSError, ValueError) as e:  # offline, unknown repo, gated repo: huggingface_hub's errors are OSErrors
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else \
            first_line(e)[:200]
        raise ConfigError(f"teacher {repo!r} is not a local directory and could not be loaded from the Hugging Face "
                          f"hub ({reason}); download it where there is network, or give a local pipeline "
                          "directory") from None


def unet_with_config(unet: Any, **changes: Any) -> Any:
    """A new ``UNet2DConditionModel`` of ``unet``'s config with ``changes`` (random weights; the caller loads them).

    diffusers' ``from_config`` drops every key listed in the config's ``_use_default_values`` (those its config.json
    did not state: SD 1.5's hub config, written by diffusers 0.6, states neither ``time_cond_proj_dim`` nor
    ``class_embed_type``), so a change to one of them would be silently ignored; the list is left out here."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if k != "_use_default_values"}
    return UNet2DConditionModel.from_config({**config, **changes})
