"""Shared fixtures: tiny real diffusers pipelines saved to disk once per session, offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distill_diffusion.config import load_config
from distill_diffusion.trainer import Trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; with two, a busy core makes OpenMP spin and a 0.03 s call take 4 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"sd15": path, "sd21": path, "sdxl": path}``: tiny pipelines written with ``save_pretrained``."""
    from distill_diffusion.tiny import TINY_KINDS, tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind in TINY_KINDS:
        path = root / kind
        tiny_pipeline(kind).save_pretrained(path)
        out[kind] = str(path)
    return out


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def trainer_for(tmp_path: Path, config: str, method: str | None = None, *overrides: str) -> Trainer:
    """A trainer for the shipped ``configs/gmm_<config>.yaml``; a test variant (a method registered under another
    name) reads the same knobs from a section named after it."""
    path = CONFIGS / f"gmm_{config}.yaml"
    if method is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text((CONFIGS / f"gmm_{config}.yaml").read_text().replace(f"\n{config}:", f"\n{method}:"))
    cfg = load_config(path, [f"method={method or config}", "train.progress=false", *overrides])
    return Trainer(cfg, tmp_path / "run")
