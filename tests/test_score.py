"""The score family's plumbing: DMD2's two-stage schedule, real data for the GAN head, guidance and prompt dropout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_config

from distill_diffusion.denoiser import Cond
from distill_diffusion.errors import ConfigError
from distill_diffusion.methods.score import drop_prompts
from distill_diffusion.trainer import Trainer


def test_dmd2_two_stage_schedule_switches_gan_and_both_lrs() -> None:
    """Stage 2 of DMD2's SD 1.5 recipe lowers both roles' learning rates (the reference's stage-2 script: generator
    and guidance lr 5e-7); each role gets its own."""
    args = {"lr_student": 1e-3, "lr_critic": 1e-3, "critic_updates": 1, "gan_student_weight": 1e-3,
            "gan_critic_weight": 1e-2, "gan_start": 2, "stage2_lr_student": 1e-5, "stage2_lr_critic": 2e-5}
    trainer = Trainer(make_config("dmd2", args=args, train={"batch_size": 16, "steps": 8}))
    seen = []
    for _ in range(8):
        phase, logs = trainer.train_step()
        lr = trainer.optimizers[phase].param_groups[0]["lr"]
        seen.append((phase, any(k.startswith("loss_gan") for k in logs), lr))
    # steps 0-3 come before the 2nd student update: no GAN, stage-1 lr; from step 4 on, GAN and the stage-2 lrs
    assert seen[:4] == [("critic", False, 1e-3), ("student", False, 1e-3)] * 2
    assert seen[4:] == [("critic", True, 2e-5), ("student", True, 1e-5)] * 2


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd"])
def test_gan_needs_real_images_for_an_image_teacher(tmp_path: Path, tiny_dirs: dict[str, str], method: str) -> None:
    cfg = make_config(method, tiny_dirs["sd15"], args={"gan_student_weight": 1e-3, "gan_critic_weight": 1e-2},
                      train={"batch_size": 2, "steps": 2})
    with pytest.raises(ConfigError, match="data.real"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("method", ["dmd2", "sid", "vsd"])
def test_digits_real_images_reach_the_gan_with_their_captions(method: str) -> None:
    """The GAN head is the score family's, not DMD2's: every member takes it through config."""
    args = {"gan_student_weight": 1e-3, "gan_critic_weight": 1e-2, "critic_updates": 1}
    trainer = Trainer(make_config(method, "embedded:digits", args=args, data={"real": "digits"},
                                  train={"batch_size": 4, "steps": 2}))
    batch = trainer.data.sample(4, torch.Generator().manual_seed(0))
    assert batch.real.shape == batch.noise.shape
    assert 0.5 < float(batch.real.std()) < 2.0  # the teacher's latents are scaled to about unit variance
    assert batch.real_cond.embeds.shape == batch.cond.embeds.shape
    phase, logs = trainer.train_step()
    assert phase == "critic" and "d_real" in logs
    phase, logs = trainer.train_step()
    assert phase == "student" and "loss_gan_student" in logs


def test_prompt_dropout_swaps_whole_rows_for_the_null_prompt() -> None:
    cond = Cond(embeds=torch.ones(1000, 3, 2), uncond=Cond(embeds=torch.zeros(1000, 3, 2)))
    dropped = drop_prompts(cond, 0.1, torch.Generator().manual_seed(0))
    rows = dropped.embeds.flatten(1)
    assert torch.all((rows == 0).all(1) | (rows == 1).all(1))
    assert 0.07 < float((rows == 0).all(1).float().mean()) < 0.13
    assert torch.equal(dropped.uncond.embeds, cond.uncond.embeds)
    assert drop_prompts(cond, 0.0, torch.Generator()) is cond


def test_vsd_with_dmd_weighting_steps_the_student_as_dmd2_does() -> None:
    """``vsd.student_weighting: dmd`` is DMD's per-sample normaliser on VSD's score difference: with both CFG scales 1
    and the same seeds, the student's gradient is DMD2's exactly; with SwiftBrush's sigma^2 weighting it is not."""
    def student_grad(method: str, **args) -> torch.Tensor:  # noqa: ANN003
        common = {"teacher_cfg": 1.0, "t_min": 0.02, "t_max": 0.98, "lr_student": 1e-3}
        trainer = Trainer(make_config(method, args={**common, **args}, model={"timesteps": [999]},
                                      train={"batch_size": 16, "steps": 1}))
        method_obj, models = trainer.method, trainer.models
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a critic that differs from the teacher (at init the two agree and the gradient is 0)
            for p in models.critic.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        batch = trainer.data.sample(16, torch.Generator().manual_seed(1))
        loss, _ = method_obj.student_loss(batch, torch.Generator().manual_seed(2))
        params = [p for p in models.student.parameters() if p.requires_grad]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    dmd2 = student_grad("dmd2")
    vsd_dmd = student_grad("vsd", critic_cfg=1.0, student_weighting="dmd")
    vsd = student_grad("vsd", critic_cfg=1.0)
    assert dmd2.abs().max() > 0
    assert torch.allclose(vsd_dmd, dmd2, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(vsd, dmd2, rtol=1e-2)
    with pytest.raises(ConfigError, match="student_weighting"):
        make_config("vsd", args={"student_weighting": "snr"})
