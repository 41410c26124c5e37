"""Damaged checkpoints (issue 22): a file truncated, emptied, overwritten with random bytes or missing is found when a
run resumes; the run continues from the newest intact checkpoint, bit-identical to an uninterrupted run, and the
damaged checkpoint is kept aside. With no intact checkpoint the resume is refused in one line and nothing changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_config
from safetensors.torch import load_file

from distill_diffusion import rundir
from distill_diffusion.cli import main
from distill_diffusion.config import Config
from distill_diffusion.errors import ConfigError, RunError
from distill_diffusion.trainer import Trainer

DAMAGES = ("truncated", "empty", "random", "missing")


def config(steps: int) -> Config:
    """DMD2 on the mixture with a critic, EMA and a method state: checkpoints hold every kind of file."""
    return make_config("dmd2", args={"teacher_cfg": 1.0, "critic_updates": 2, "lr_student": 1e-3, "lr_critic": 1e-3},
                       train={"steps": steps, "batch_size": 32, "checkpoint_every": 6, "ema_decay": 0.9,
                              "eval_samples": 100})


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "random":  # same length: only reading it can tell
        file.write_bytes(bytes((b * 131 + 17 + i) % 256 for i, b in enumerate(data)))
    else:
        file.unlink()


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped at step 12: checkpoints at 6 and 12."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    Trainer(config(12), run).train()
    assert [p.name for p in rundir.checkpoints(run)] == ["step_00000006", "step_00000012"]
    return run


def test_checkpoints_list_their_files_and_sizes(stopped: Path) -> None:
    newest = rundir.checkpoints(stopped)[-1]
    assert rundir.checkpoint_problem(newest) is None
    files = json.loads((newest / rundir.STATE_FILE).read_text())["files"]
    names = {f.name for f in newest.iterdir()} - {rundir.STATE_FILE}
    assert set(files) == names and {"model.safetensors", "model_1.safetensors", "optimizer.bin",
                                     "ema.safetensors", "rng.safetensors"} <= names, names


@pytest.mark.parametrize("how", DAMAGES)
def test_each_file_damaged_each_way_is_found_and_the_previous_checkpoint_chosen(stopped: Path, tmp_path: Path,
                                                                                how: str) -> None:
    newest = rundir.checkpoints(stopped)[-1]
    for file in sorted(newest.iterdir()):
        if how == "random" and file.suffix == ".json":
            continue  # random bytes in JSON are covered by 'truncated' and 'empty'; a shuffle may stay valid JSON
        run = tmp_path / file.name
        shutil.copytree(stopped, run)
        damage(run / "checkpoints" / newest.name / file.name, how)
        resume_from, damaged = rundir.prepare(config(18), run, resume=True)
        assert resume_from is not None and resume_from.name == "step_00000006", (file.name, how)
        assert [(p.name, problem.split(":")[0]) for p, problem in damaged] == [(newest.name, file.name)], damaged


def test_resume_past_a_damaged_checkpoint_is_bit_identical_and_keeps_it_aside(stopped: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(config(18), straight).train()
    shutil.copytree(stopped, split)
    damage(split / "checkpoints/step_00000012/model_1.safetensors", "truncated")  # the critic's weights
    Trainer(config(18), split, resume=True).train()
    err = capsys.readouterr().err
    assert "checkpoint step_00000012 is damaged (model_1.safetensors:" in err and "resuming from step_00000006" in err
    aside = split / "checkpoints/damaged_step_00000012"
    assert aside.is_dir() and (aside / "model.safetensors").is_file()
    for name in ("final/student.safetensors", "final/student_ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    first = (split / "logs.jsonl").read_text().splitlines()
    assert any('"set_aside": ["damaged_step_00000012"]' in line for line in first)


def test_no_intact_checkpoint_refuses_in_one_line_and_changes_nothing(stopped: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    for ckpt in rundir.checkpoints(run):
        damage(ckpt / "optimizer.bin", "empty")
    before = snapshot(run)
    with pytest.raises(RunError, match=r"every checkpoint is damaged \(the newest, step_00000012: optimizer.bin"):
        Trainer(config(18), run, resume=True)
    assert snapshot(run) == before
    cfg = run / "config.yaml"
    assert main(["distill", str(cfg), "--out", str(run), "--resume"]) == 1
    assert snapshot(run) == before


def test_out_naming_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        Trainer(config(6), file)
    assert file.read_text() == "x"
