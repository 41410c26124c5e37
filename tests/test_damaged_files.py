"""Damaged files the tool reads (issue 22): each loads or is refused in one line naming the file; a damaged cache of
reference statistics is recomputed, never trusted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config

from distill_diffusion.config import load_config
from distill_diffusion.data import read_prompt_file
from distill_diffusion.errors import ConfigError
from distill_diffusion.rundir import load_finished_run, load_run_config
from distill_diffusion.teachers import load_pipeline
from distill_diffusion.trainer import Trainer
from eval.fid import FeatureStats, cached_stats
from eval.generate import load_model


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


def test_a_teacher_with_a_truncated_weight_file_is_refused(tiny_dirs: dict[str, str], tmp_path: Path) -> None:
    teacher = tmp_path / "sd15"
    shutil.copytree(tiny_dirs["sd15"], teacher)
    weights = next((teacher / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError) as e:
        load_pipeline(str(teacher))
    assert f"teacher {str(teacher)!r} could not be loaded" in one_line(e) and "damaged or missing" in one_line(e)


def test_a_damaged_pipeline_or_export_record_is_refused_when_sampled(tiny_dirs: dict[str, str],
                                                                     tmp_path: Path) -> None:
    pipe = tmp_path / "export"
    shutil.copytree(tiny_dirs["sd15"], pipe)
    (pipe / "export.json").write_text('{"timesteps": [999, ')
    with pytest.raises(ConfigError) as e:
        load_model(str(pipe))
    assert f"{str(pipe / 'export.json')!r} is damaged" in one_line(e)
    (pipe / "vae" / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError) as e:
        load_model(str(pipe))
    assert f"pipeline {str(pipe)!r} could not be loaded" in one_line(e)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    Trainer(make_config("dmd2", train={"steps": 4, "batch_size": 16, "checkpoint_every": 4, "eval_samples": 50}),
            run).train()
    return run


@pytest.mark.parametrize("how", ["truncated", "empty"])
def test_a_damaged_final_student_is_refused(finished: Path, tmp_path: Path, how: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for f in (run / "final").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[: 50] if how == "truncated" else b"")
    with pytest.raises(ConfigError) as e:
        load_finished_run(run)
    assert "student" in one_line(e) and "is damaged" in one_line(e)


def test_a_damaged_run_config_is_refused(finished: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "config.yaml").write_bytes(b"method: dmd2\n  model: [\xff\xfe")
    with pytest.raises(ConfigError) as e:
        load_run_config(run)
    assert f"run config {str(run / 'config.yaml')!r} is damaged" in one_line(e)
    with pytest.raises(ConfigError, match="is damaged"):
        Trainer(load_config(finished / "config.yaml"), run, resume=True)


def test_non_utf8_text_files_are_named(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a photo of a caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_prompt_file(prompts)
    assert f"prompt file {str(prompts)!r} is not UTF-8 text" in one_line(e)
    config = tmp_path / "config.yaml"
    config.write_bytes(b"method: dmd2\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(config)


def features(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)[:, :3]


def test_a_damaged_statistics_cache_is_recomputed_and_a_damaged_reference_refused(tmp_path: Path) -> None:
    images = torch.rand(20, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    fresh = cached_stats(images, features, None)
    cache = tmp_path / "ref.npz"
    for damage in (b"", b"PK\x03\x04 not a zip", np.zeros(3).tobytes()):
        cache.write_bytes(damage)
        stats = cached_stats(images, features, cache)
        assert np.allclose(stats.mu, fresh.mu) and np.allclose(stats.sigma, fresh.sigma)
        assert np.allclose(FeatureStats.load(cache).mu, fresh.mu)  # rewritten whole
    other = tmp_path / "other.npz"
    np.savez(other, mean=fresh.mu)  # another tool's keys
    with pytest.raises(ConfigError) as e:
        FeatureStats.load(other)
    assert f"feature statistics {str(other)!r} do not load" in one_line(e)
