"""Shared fixtures: tiny real diffusers pipelines saved to disk once per session, offline."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
