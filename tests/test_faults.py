"""Faults: a run killed with SIGKILL at random moments (many of them while a checkpoint is being written) and resumed
each time ends bit-identical to an uninterrupted run, and no checkpoint it leaves is ever corrupt; non-finite losses
and gradients are skipped, counted, and stop the run when they persist, and never reach a checkpoint or an export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import load as accelerate_load
from safetensors.torch import load_file

from distill_diffusion.config import load_config
from distill_diffusion.methods import METHODS
from distill_diffusion.methods.dmd2 import DMD2
from distill_diffusion.rundir import latest_checkpoint
from distill_diffusion.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gmm_dmd2.yaml"
# checkpoints every 5 steps: writing them is a large share of the run's time, so random kills often land mid-write
OVERRIDES = ["train.steps=300", "train.batch_size=64", "train.checkpoint_every=5", "train.keep_checkpoints=2",
             "dmd2.critic_updates=2", "train.ema_decay=0.9", "train.progress=false", "train.eval_samples=200",
             "train.log_every=5"]
KILLS = 20


def launch(run: Path) -> subprocess.Popen:
    """``distill-diffusion distill ... --resume``, as a preemptible job would be restarted, in its own process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "distill_diffusion.cli", "distill", str(CONFIG), "--out", str(run), "--resume",
           *OVERRIDES]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def records(run: Path) -> list[dict]:
    path = run / "logs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def writing(run: Path) -> bool:
    root = run / "checkpoints"
    try:
        return any(p.name.startswith(".tmp_") for p in os.scandir(root))
    except FileNotFoundError:
        return False


def published(run: Path) -> int:
    names = [p.name for p in (run / "checkpoints").glob("step_*")] if (run / "checkpoints").is_dir() else []
    return max([int(n[len("step_"):]) for n in names], default=0)


def assert_intact(run: Path) -> int:
    """Every published checkpoint loads whole; returns the newest one's step (0 if none)."""
    root = run / "checkpoints"
    steps = [0]
    for ckpt in sorted(root.glob("step_*")) if root.is_dir() else []:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == int(ckpt.name[len("step_"):])
        for f in ckpt.iterdir():
            if f.suffix == ".safetensors":
                assert load_file(str(f)), f
            elif f.suffix in (".bin", ".pkl"):  # accelerate's optimizer / RNG states, read back with weights_only
                assert accelerate_load(str(f)) is not None, f
        for f in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "rng.safetensors", "ema.safetensors"):
            assert (ckpt / f).is_file(), (ckpt, f)
        steps.append(state["step"])
    return max(steps)


@pytest.mark.slow  # 3.5 min; run the slow tier after touching checkpoints or resume
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    Trainer(load_config(CONFIG, OVERRIDES), straight).train()

    run, rng = tmp_path / "killed", random.Random(7)
    newest, mid_write, resumes = 0, 0, 0
    for i in range(KILLS):
        before = len([r for r in records(run) if "started_from" in r])
        proc = launch(run)
        deadline = time.time() + 120
        # wait for training to start (or resume), so the kill lands in the loop or a checkpoint write
        while proc.poll() is None and time.time() < deadline and \
                len([r for r in records(run) if "started_from" in r]) == before:
            time.sleep(0.01)
        aim = i % 2 == 0  # half the kills aim at a checkpoint being written, after this process published one
        if aim:
            while proc.poll() is None and time.time() < deadline and published(run) <= newest:
                time.sleep(0.005)
            while proc.poll() is None and time.time() < deadline and not writing(run):
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read().decode()[-2000:]
        mid_write += aim and writing(run)
        started = [r for r in records(run) if "started_from" in r]
        if len(started) > before and before > 0:  # it resumed: from the newest checkpoint there was
            resumes += 1
            assert started[before]["step"] == newest, (started[before], newest)
        step = assert_intact(run)
        assert step >= newest  # never lost a complete checkpoint
        newest = step
    print(f"kills {KILLS}, mid-write {mid_write}, resumes {resumes}, newest {newest}")
    assert mid_write >= 3 and resumes >= KILLS // 2, (mid_write, resumes)
    assert 30 <= newest < 300  # the kills interrupted the run, and the resumes made progress

    done = launch(run)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err.decode()[-2000:]
    for name in ("final/student.safetensors", "final/student_ema.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    steps = [r["step"] for r in records(run) if "loss_student" in r or "loss_critic" in r]
    assert steps == sorted(set(steps))  # the log holds each interval once: lost steps' lines were dropped


class NaNOnSteps(DMD2):
    """DMD2 whose loss is NaN on ``bad_steps`` and whose loss is finite but gradients are not on ``bad_grad_steps``:
    a real plugin through the public interface, standing in for a teacher that overflows on some batches."""

    bad_steps: frozenset[int] = frozenset()
    bad_grad_steps: frozenset[int] = frozenset()

    def loss(self, phase, batch, generator, step):  # noqa: ANN001
        loss, logs = super().loss(phase, batch, generator, step)
        if step in self.bad_steps:
            return loss * float("nan"), logs
        if step in self.bad_grad_steps:  # sqrt(0 * |p|): value 0, gradient inf * 0 = NaN
            p = next(p for p in getattr(self.models, phase).parameters() if p.requires_grad)
            return loss + torch.sqrt(p.abs().sum() * 0), logs
        return loss, logs


@pytest.fixture
def nan_method(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setitem(METHODS, "nan_dmd2", NaNOnSteps)
    return NaNOnSteps


def nan_config(tmp_path: Path, steps: int):  # noqa: ANN201
    path = tmp_path / "nan.yaml"
    path.write_text(CONFIG.read_text().replace("\ndmd2:", "\nnan_dmd2:").replace("method: dmd2", "method: nan_dmd2"))
    return load_config(path, [o.replace("dmd2.", "nan_dmd2.") for o in OVERRIDES] + [f"train.steps={steps}"])


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, nan_method) -> None:  # noqa: ANN001
    nan_method.bad_steps, nan_method.bad_grad_steps = frozenset({3, 4, 11}), frozenset({7, 14})
    Trainer(nan_config(tmp_path, 30), tmp_path / "run").train()
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["skipped"] == 5 and sum(state["counts"].values()) == 25
    weights = load_file(str(tmp_path / "run" / "final" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_persistent_non_finite_losses_stop_the_run_with_finite_checkpoints(tmp_path: Path, nan_method) -> None:  # noqa: ANN001
    nan_method.bad_steps = frozenset(range(12, 100))
    with pytest.raises(RuntimeError, match="10 non-finite losses or gradients in a row at step 21"):
        Trainer(nan_config(tmp_path, 60), tmp_path / "run").train()
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000020"
    for f in ckpt.glob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values() if v.is_floating_point())
    assert not (tmp_path / "run" / "final").exists()
