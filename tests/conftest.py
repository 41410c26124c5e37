"""Shared fixtures and builders: tiny real diffusers pipelines saved to disk once per session (offline), configs
built in Python or from the shipped mixture configs, trainers with or without a run directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from distill_diffusion.config import Config, load_config, parse_config
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


def make_config(method: str, teacher: str = "gmm", *, args: dict | None = None, model: dict | None = None,
                train: dict | None = None, data: dict | None = None) -> Config:
    """A config built in Python: the method's knobs in ``args``, the other sections as dicts (progress bar off)."""
    return parse_config({"method": method, method: dict(args or {}), "model": {"teacher": teacher, **(model or {})},
                         "train": {"progress": False, **(train or {})}, "data": dict(data or {})})


def gmm_config(tmp_path: Path, config: str, method: str | None = None, *overrides: str) -> Config:
    """The shipped ``configs/gmm_<config>.yaml`` with ``key=value`` overrides; a test variant (a method registered
    under another name) reads the same knobs from a section named after it."""
    path = CONFIGS / f"gmm_{config}.yaml"
    if method is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text((CONFIGS / f"gmm_{config}.yaml").read_text().replace(f"\n{config}:", f"\n{method}:"))
    return load_config(path, [f"method={method or config}", "train.progress=false", *overrides])


def trainer_for(tmp_path: Path, config: str, method: str | None = None, *overrides: str) -> Trainer:
    """A trainer writing ``tmp_path/run`` for the shipped mixture config (`gmm_config`)."""
    return Trainer(gmm_config(tmp_path, config, method, *overrides), tmp_path / "run")
