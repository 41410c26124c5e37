"""Memory savers that change numbers: frozen weights in half precision under bf16, 8-bit AdamW, the attention switch.

Each is checked for what it claims (the frozen bytes halve, the optimizer states are 8-bit, the student still
learns the known answer, a resume is still exact) and for what it must not do (touch trainable weights, write a
checkpoint or export in half precision, start a run it cannot finish).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, make_config, trainer_for
from safetensors.torch import load_file

from distill_diffusion.assembly import assemble
from distill_diffusion.config import Config, load_config
from distill_diffusion.errors import ConfigError
from distill_diffusion.memory import cast_frozen
from distill_diffusion.rundir import latest_checkpoint, load_finished_run
from distill_diffusion.trainer import Trainer


@pytest.fixture(autouse=True)
def fresh_precision() -> Iterator[None]:
    """accelerate fixes one mixed precision per process; these tests switch it, so each starts and ends unset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def sd_config(tiny_dir: str, **train: object) -> Config:
    return make_config("dmd2", tiny_dir, args={"teacher_cfg": 2.0},
                       model={"timesteps": [999, 499], "critic_lora_rank": 4},
                       train={"steps": 4, "batch_size": 2, "checkpoint_every": 2, **train})


def frozen_and_own(trainer: Trainer) -> tuple[set, set]:
    own = {id(p) for ps in trainer.params.values() for p in ps}
    m = trainer.models
    nets = [m.teacher, m.student, m.critic, m.vae, *m.text.encoders]
    frozen = {p.dtype for n in nets for p in n.parameters() if id(p) not in own}
    return frozen, {p.dtype for ps in trainer.params.values() for p in ps}


def test_bf16_keeps_frozen_weights_in_half_and_trainable_in_fp32(tmp_path: Path, tiny_dirs: dict) -> None:
    trainer = Trainer(sd_config(tiny_dirs["sd15"], mixed_precision="bf16"), tmp_path / "run")
    assert frozen_and_own(trainer) == ({torch.bfloat16}, {torch.float32})
    trainer.train()
    for f in (latest_checkpoint(tmp_path / "run") / "model.safetensors", tmp_path / "run/final/student.safetensors"):
        state = load_file(str(f))
        assert {v.dtype for v in state.values()} == {torch.float32}, f
        assert all(torch.isfinite(v).all() for v in state.values()), f
    models = load_finished_run(tmp_path / "run").models  # export and sampling rebuild the teacher in fp32
    assert {p.dtype for p in models.student.parameters()} == {torch.float32}
    # opting out keeps everything fp32
    kept = Trainer(sd_config(tiny_dirs["sd15"], mixed_precision="bf16", half_frozen=False), tmp_path / "kept")
    assert frozen_and_own(kept) == ({torch.float32}, {torch.float32})


def test_dmd2_runs_its_critic_in_full_precision_in_the_student_loss(tiny_dirs: dict) -> None:
    """tianweiy/DMD2 runs the fake UNet in fp32 in the distribution-matching loss ("autocast and no_grad don't work
    well together"), the real UNet in bf16: under bf16 autocast a full-weight critic's layers here compute in fp32 too
    (a LoRA critic shares the teacher's frozen base, which train.half_frozen keeps in bf16)."""
    trainer = Trainer(make_config("dmd2", tiny_dirs["sd15"], model={"timesteps": [999]},
                                  train={"batch_size": 2, "mixed_precision": "bf16"}))
    m = trainer.models
    seen: dict[str, set] = {"critic": set(), "teacher": set()}
    hooks = [net.conv_in.register_forward_hook(lambda mod, i, o, k=k: seen[k].add(o.dtype))  # returns None
             for k, net in (("critic", m.critic.net), ("teacher", m.teacher.denoiser.net))]
    batch = trainer.data.sample(2, torch.Generator().manual_seed(0))
    with trainer.accelerator.autocast():
        trainer.method.student_loss(batch, torch.Generator().manual_seed(1))
    for h in hooks:
        h.remove()
    assert seen == {"critic": {torch.float32}, "teacher": {torch.bfloat16}}, seen


def test_half_teacher_halves_its_bytes_and_stays_close(tiny_dirs: dict) -> None:
    cfg = sd_config(tiny_dirs["sd15"])
    models = assemble(cfg, train=False).models
    teacher_bytes = sum(p.numel() * p.element_size() for p in models.teacher.parameters())
    cond = models.text.encode(["a photo of a cat", "a dog"])
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, *models.sample_shape), generator=gen)
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ref = models.teacher.x0(x_t, t, cond, 2.0)
        saved = cast_frozen(models, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = models.teacher.x0(x_t, t, cond, 2.0).float()
    assert {p.dtype for p in models.teacher.parameters()} == {torch.bfloat16}
    # the student (a full copy, trainable) keeps its 4 bytes; the teacher, VAE and text encoders lose half of theirs
    assert saved >= teacher_bytes // 2
    assert {p.dtype for p in models.student.parameters()} == {torch.float32}
    rel = (half - ref).norm() / ref.norm()
    assert rel < 0.03, rel  # bf16 keeps 8 bits of mantissa: ~0.4% per weight; measured 0.8% at the output


def test_adamw8bit_states_are_8bit_and_resume_exactly(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    def cfg(steps: int):  # noqa: ANN202
        return load_config(CONFIGS / "gmm_dmd2.yaml", [
            "train.optimizer=adamw8bit", f"train.steps={steps}", "train.checkpoint_every=30", "train.progress=false",
            "train.eval_samples=200", "train.ema_decay=0.9"])

    straight = Trainer(cfg(60), tmp_path / "straight")
    opt = straight.optimizers["student"].optimizer
    assert isinstance(opt, bnb.optim.AdamW8bit)
    straight.train()
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values() if "state1" in s)  # >= 4096 weights
    Trainer(cfg(30), tmp_path / "split").train()
    Trainer(cfg(60), tmp_path / "split", resume=True).train()
    for name in ("student.safetensors", "student_ema.safetensors"):
        a = load_file(str(tmp_path / "straight/final" / name))
        b = load_file(str(tmp_path / "split/final" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_mixture_known_answer_under_bf16_and_adamw8bit(tmp_path: Path) -> None:
    """DMD2's shipped mixture config under bf16 autocast with 8-bit AdamW still meets the issue-5 bar (measured
    ED 0.00043, std ratio 0.96, coverage 0.99)."""
    pytest.importorskip("bitsandbytes")
    m = trainer_for(tmp_path, "dmd2", None, "train.mixed_precision=bf16", "train.optimizer=adamw8bit").train()
    assert m["energy_distance"] <= 0.004 and 0.7 <= m["std_ratio"] <= 1.35 and m["coverage"] >= 0.9, m


def test_xformers_without_a_gpu_is_one_line_and_writes_nothing(tmp_path: Path, tiny_dirs: dict) -> None:
    """Where xformers can run (a CUDA GPU and the package) the switch must take; anywhere else it must refuse."""
    cfg = sd_config(tiny_dirs["sd15"], attention="xformers")
    if torch.cuda.is_available() and importlib.util.find_spec("xformers") is not None:
        trainer = Trainer(cfg, tmp_path / "run")
        procs = trainer.models.teacher.denoiser.net.attn_processors.values()
        assert all("XFormers" in type(p).__name__ for p in procs), {type(p).__name__ for p in procs}
        return
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message and "xformers" in message and "sdpa" in message
    assert not (tmp_path / "run").exists()


def test_adamw8bit_without_bitsandbytes_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when it is not installed
    cfg = load_config(CONFIGS / "gmm_dmd2.yaml", ["train.optimizer=adamw8bit", "train.progress=false"])
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message and "bitsandbytes" in message and "adamw" in message
    assert not (tmp_path / "run").exists()
