"""Checkpoint and resume: a run stopped after a checkpoint and resumed equals an uninterrupted run, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_config
from safetensors.torch import load_file

from distill_diffusion.config import Config
from distill_diffusion.errors import ConfigError
from distill_diffusion.rundir import latest_checkpoint
from distill_diffusion.trainer import Trainer


def config(steps: int, **model: object) -> Config:
    return make_config("dmd2", args={"teacher_cfg": 1.0, "critic_updates": 2, "lr_student": 1e-3, "lr_critic": 1e-3},
                       model={"timesteps": [999, 499], **model},
                       train={"steps": steps, "batch_size": 64, "checkpoint_every": 30, "ema_decay": 0.9,
                              "eval_samples": 200})


def weights(run: Path, name: str) -> dict:
    return load_file(str(run / name))


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(config(90), straight).train()
    Trainer(config(45), split).train()  # stops at 45: checkpoints at 30 and 45
    assert latest_checkpoint(split).name == "step_00000045"
    Trainer(config(90), split, resume=True).train()
    for name in ("final/student.safetensors", "final/student_ema.safetensors"):
        a, b = weights(straight, name), weights(split, name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    ca, cb = latest_checkpoint(straight), latest_checkpoint(split)
    assert ca.name == cb.name == "step_00000090"
    for f in ("model.safetensors", "model_1.safetensors"):  # student and critic
        a, b = weights(ca, f), weights(cb, f)
        assert all((a[k] == b[k]).all() for k in a), f


def test_a_wall_clock_budget_stops_early_writes_final_and_resumes(tmp_path: Path) -> None:
    """``train.max_seconds`` (the leaderboard's equal budget per method) stops at a step boundary once the budget is
    spent, writes final/ and logs why; the run resumes to its full length with the budget lifted."""
    import json

    cfg = config(100000)
    cfg.train.max_seconds = 2.0
    run = tmp_path / "run"
    Trainer(cfg, run).train()
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    stop = [r for r in logs if "stopped" in r]
    assert len(stop) == 1 and "train.max_seconds 2" in stop[0]["stopped"] and 0 < stop[0]["step"] < 100000
    assert (run / "final" / "student.safetensors").is_file()
    assert latest_checkpoint(run).name == f"step_{stop[0]['step']:08d}"
    more = config(stop[0]["step"] + 3)
    assert Trainer(more, run, resume=True).train() is not None
    assert latest_checkpoint(run).name == f"step_{stop[0]['step'] + 3:08d}"


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    Trainer(config(30), tmp_path / "run").train()
    with pytest.raises(ConfigError, match="model.timesteps"):
        Trainer(config(60, timesteps=[999]), tmp_path / "run", resume=True)


def test_new_run_refuses_a_used_directory(tmp_path: Path) -> None:
    Trainer(config(30), tmp_path / "run").train()
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(config(60), tmp_path / "run")
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_keeps_only_the_newest_checkpoints(tmp_path: Path) -> None:
    Trainer(config(120), tmp_path / "run").train()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000090", "step_00000120"]


def test_lora_roles_checkpoint_their_adapters_only_and_resume_exactly(tmp_path: Path,
                                                                      tiny_dirs: dict[str, str]) -> None:
    """Student and critic as adapters on the teacher's UNet: a checkpoint holds each role's adapter, not the shared
    base (which would be one full UNet per role), and resuming from it still equals the uninterrupted run."""
    def lora(steps: int) -> Config:
        fast = {"critic_updates": 1, "lr_student": 1e-3, "lr_critic": 1e-3}
        return make_config("dmd2", tiny_dirs["sd15"], args=fast,
                           model={"timesteps": [999], "student_lora_rank": 4, "critic_lora_rank": 4},
                           train={"steps": steps, "batch_size": 2, "checkpoint_every": 4, "eval_samples": 4})
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(lora(8), straight).train()
    Trainer(lora(4), split).train()
    ckpt = latest_checkpoint(split)
    for f, tag in (("model.safetensors", ".student."), ("model_1.safetensors", ".critic.")):
        keys = list(weights(ckpt, f))
        assert keys and all(tag in k and ".lora_" in k for k in keys), (f, keys[:3])
    Trainer(lora(8), split, resume=True).train()
    a, b = weights(straight, "final/student.safetensors"), weights(split, "final/student.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the adapter trained


@pytest.mark.parametrize("method", ["consistency", "progressive"])
def test_method_state_resumes_exactly(tmp_path: Path, method: str) -> None:
    """What a method keeps outside the roles (consistency's EMA target, progressive's round teacher) is checkpointed:
    stopping mid-run (for progressive: in its second round, and once exactly at the round boundary) and resuming
    equals the uninterrupted run bit for bit."""
    args = {"consistency": {"lr_student": 1e-3, "target_ema": 0.9, "grid_steps": 10},
            "progressive": {"lr_student": 1e-3, "start_steps": 8, "steps_per_round": 20}}[method]

    def cfg(steps: int) -> Config:
        return make_config(method, args=args, model={"timesteps": [999, 499]},
                           train={"steps": steps, "batch_size": 64, "checkpoint_every": 10, "eval_samples": 200})
    straight = tmp_path / "straight"
    Trainer(cfg(40), straight).train()
    for stop in (20, 30):
        split = tmp_path / f"split{stop}"
        Trainer(cfg(stop), split).train()
        Trainer(cfg(40), split, resume=True).train()
        a, b = weights(straight, "final/student.safetensors"), weights(split, "final/student.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stop
    state = weights(latest_checkpoint(straight), "method.safetensors")
    assert any(k.startswith(("target.", "round_teacher.")) for k in state)
