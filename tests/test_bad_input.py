"""Bad input, the rows of ``docs/bad_input.md`` not covered where their feature is tested: each is refused with one
line naming what was wrong and what is allowed, and nothing written before is damaged."""

from __future__ import annotations

import json
import resource
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS, gmm_config
from PIL import Image
from safetensors.torch import load_file, save_file

from distill_diffusion.config import Config, load_config
from distill_diffusion.errors import ConfigError, RunError
from distill_diffusion.rundir import latest_checkpoint, load_finished_run
from distill_diffusion.trainer import Trainer

GMM = ["train.progress=false", "train.eval_samples=200", "train.batch_size=64", "dmd2.critic_updates=1"]


def one_line(error: type[Exception], fn, *args) -> str:  # noqa: ANN001
    with pytest.raises(error) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def image_run(tmp_path: Path, teacher: str, *overrides: str) -> Config:
    return gmm_config(tmp_path, "dmd2", None, f"model.teacher={teacher}", *GMM, "train.batch_size=2", "train.steps=2",
                      *overrides)


def test_a_directory_that_is_not_a_diffusers_pipeline(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "unet.safetensors").write_bytes(b"")
    message = one_line(ConfigError, Trainer, image_run(tmp_path, str(tmp_path / "weights")), tmp_path / "run")
    assert "not a diffusers pipeline directory" in message and "model_index.json" in message
    assert not (tmp_path / "run").exists()


def test_a_hub_id_that_cannot_be_reached(tmp_path: Path) -> None:
    """GPU configs name hub ids; offline (as here, HF_HUB_OFFLINE=1) and not cached, that is one clear line."""
    cfg = image_run(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = one_line(ConfigError, Trainer, cfg, tmp_path / "run")
    assert "could not be loaded from the Hugging Face hub" in message and "local pipeline directory" in message
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_an_unknown_prediction_type(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_dirs["sd15"], teacher)
    sched = teacher / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "x_start"}))
    message = one_line(ValueError, Trainer, image_run(tmp_path, str(teacher)), tmp_path / "run")
    assert "x_start" in message and "epsilon, v_prediction, sample" in message
    assert not (tmp_path / "run").exists()


def test_a_lora_student_on_the_mixture_teacher(tmp_path: Path) -> None:
    """A method/teacher mismatch: LoRA roles need a diffusers UNet, the mixture teacher is an exact formula."""
    cfg = gmm_config(tmp_path, "dmd2", None, *GMM, "model.student_lora_rank=4")
    assert "need a diffusers teacher" in one_line(ConfigError, Trainer, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lora_rank_zero() -> None:
    message = one_line(ConfigError, load_config, CONFIGS / "gmm_dmd2.yaml", ["model.student_lora_rank=0"])
    assert "student_lora_rank must be >= 1" in message and "null" in message


def test_an_empty_prompt_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n  \n")
    cfg = image_run(tmp_path, "tiny:sd15", f"data.prompt_file={prompts}")
    assert "no prompts" in one_line(ConfigError, Trainer, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["unreadable", "too-small"])
def test_an_image_folder_with_a_bad_image(tmp_path: Path, bad: str) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    if bad == "unreadable":
        (folder / "3.png").write_bytes(b"not a png")
    else:
        Image.fromarray(np.zeros((5, 48, 3), dtype=np.uint8)).save(folder / "3.png")  # any aspect ratio, >= 8 px
    message = one_line(ConfigError, Trainer, image_run(tmp_path, "tiny:sd15", f"data.real={folder}"), tmp_path / "run")
    assert "3.png" in message
    assert ("cannot be read" in message) if bad == "unreadable" else ("48x5" in message and "at least 8x8" in message)
    assert not (tmp_path / "run").exists()


def test_disk_full_while_writing_a_checkpoint(tmp_path: Path) -> None:
    """The file-size limit (RLIMIT_FSIZE) makes writes past 100 kB fail as a full disk does; the failed checkpoint is
    removed, the previous one stays complete, and the run resumes from it once there is room again."""
    def cfg(steps: int):  # noqa: ANN202
        return gmm_config(tmp_path, "dmd2", None, *GMM, f"train.steps={steps}", "train.checkpoint_every=5")
    run = tmp_path / "run"
    Trainer(cfg(10), run).train()
    before = {f.name: f.read_bytes() for f in latest_checkpoint(run).iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        message = one_line(RunError, Trainer(cfg(20), run, resume=True).train)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "could not write checkpoint step_00000015" in message and "step_00000010 is intact" in message
    assert latest_checkpoint(run).name == "step_00000010"
    assert {f.name: f.read_bytes() for f in latest_checkpoint(run).iterdir()} == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    Trainer(cfg(20), run, resume=True).train()
    Trainer(cfg(20), tmp_path / "straight").train()
    a = load_file(str(run / "final" / "student.safetensors"))
    b = load_file(str(tmp_path / "straight" / "final" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_with_non_finite_weights_is_not_exported_or_sampled(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(gmm_config(tmp_path, "dmd2", None, *GMM, "train.steps=4"), run).train()
    path = run / "final" / "student.safetensors"
    weights = load_file(str(path))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone().fill_(float("nan"))
    save_file(weights, str(path))
    message = one_line(ConfigError, load_finished_run, run, False)
    assert "non-finite weight" in message and name in message


def test_a_final_directory_that_cannot_be_written(tmp_path: Path) -> None:
    """Training is done and its last checkpoint complete when `final/` is written; a failure there is one line that
    says so, and --resume writes `final/` without training again."""
    run = tmp_path / "run"
    cfg = gmm_config(tmp_path, "dmd2", None, *GMM, "train.steps=10", "train.checkpoint_every=5")
    trainer = Trainer(cfg, run)
    (run / ".tmp_final").write_text("a file where the temporary directory must go")  # mkdir meets FileExistsError
    message = one_line(RunError, trainer.train)
    assert "could not write" in message and "final" in message and "step_00000010 is complete" in message
    assert not (run / "final").exists() and latest_checkpoint(run).name == "step_00000010"
    (run / ".tmp_final").unlink()
    assert Trainer(cfg, run, resume=True).train()["step"] == 10
    assert (run / "final" / "student.safetensors").is_file()


def test_flow_transformer_misconfigurations(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    """Row 54: a CFG-scale embedding asked of a transformer student, a resolution that is not a multiple of 16, a
    negative embedded guidance: one line each, nothing written."""
    cfg = image_run(tmp_path, tiny_dirs["sd3"], "model.timesteps=[1000]", "model.cfg_embedding_dim=256")
    assert "cfg_embedding_dim" in one_line(ConfigError, Trainer, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    message = one_line(ConfigError, load_config, CONFIGS / "gmm_dmd2.yaml", ["model.resolution=40"])
    assert "multiple of 16" in message
    message = one_line(ConfigError, load_config, CONFIGS / "gmm_dmd2.yaml", ["model.embedded_guidance=-1"])
    assert "embedded_guidance must be >= 0" in message
