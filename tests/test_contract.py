"""The contract every entry of METHODS keeps, on the mixture teacher and on tiny SD 1.5 / 2.1 / SDXL / SD3 / Flux
/ SANA pipelines (UNet and flow-matching transformer teachers alike: nothing here names a model family).

Losses are finite; a step changes only the role its phase names; the teacher never changes; the method's config
round-trips through YAML. New methods inherit these tests by being added to METHODS: nothing here names a method.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import yaml
from conftest import make_config

from distill_diffusion.config import parse_config
from distill_diffusion.errors import ConfigError
from distill_diffusion.lora import other_adapters
from distill_diffusion.methods import METHODS
from distill_diffusion.process import NoiseProcess
from distill_diffusion.rundir import trainable_state
from distill_diffusion.teachers import load_pipeline
from distill_diffusion.trainer import Trainer

FAST = {"lr_student": 1e-3, "lr_critic": 1e-3}
PROMPTS = ["a handwritten digit seven", "a photo of a red car"]


def snapshot(module: torch.nn.Module, adapters: bool = True) -> dict[str, torch.Tensor]:
    """The module's weights; ``adapters=False`` leaves out LoRA weights (LoRA roles live on the teacher's UNet,
    and the teacher is that UNet with its adapters off)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if adapters or ".lora_" not in k}


def role_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A role's weights, less other roles' adapters when its UNet is shared with them."""
    others = other_adapters(module)
    return {k: v for k, v in snapshot(module).items() if not any(f".{a}." in k for a in others)}


def steps_to_see_every_role(trainer: Trainer) -> int:
    """The number of steps after which the method's schedule has named each of its roles."""
    roles, seen = set(trainer.method.needs.roles), set()
    for step in range(1000):
        seen.add(trainer.method.phase(step))
        if seen == roles:
            return step + 1
    raise AssertionError(f"{trainer.cfg.method} never schedules all of its roles {sorted(roles)}")


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def check_steps(trainer: Trainer, steps: int) -> set[str]:
    models = trainer.models
    teacher0 = snapshot(models.teacher, adapters=False)
    seen = set()
    for _ in range(steps):
        before = {role: role_snapshot(m) for role, m in models.trainable().items()}
        phase, logs = trainer.train_step()
        seen.add(phase)
        assert phase in trainer.method.needs.roles
        assert logs and all(math.isfinite(v) for v in logs.values()), logs
        assert trainer.skipped == 0
        for role, module in models.trainable().items():
            assert changed(before[role], module) == (role == phase), (role, phase)
        assert not changed(teacher0, models.teacher), "the teacher changed"
    return seen


@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract_on_the_mixture(method: str) -> None:
    trainer = Trainer(make_config(method, args=FAST, model={"timesteps": [999, 499]},
                                  train={"batch_size": 32, "steps": 6, "eval_samples": 64}))
    roles = trainer.method.needs.roles
    # warm up the critic first so the student's gradient is not exactly zero (critic == teacher at init)
    seen = check_steps(trainer, 2 * steps_to_see_every_role(trainer))
    assert seen == set(roles)


@functools.cache
def two_steps(teacher: str) -> list[float]:
    """The teacher's own 2-step trailing grid ([999, 499] on SD's schedule, [1000, 500] on the flow path)."""
    return NoiseProcess.from_scheduler(load_pipeline(teacher).scheduler).trailing_timesteps(2)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl", "embedded:digits", "sd3", "flux", "sana", "qwen"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_contract_on_tiny_pipelines(method: str, kind: str, tiny_dirs: dict[str, str]) -> None:
    # real images for the methods that noise data (trajectory methods) or judge it (GAN terms); others ignore them
    teacher = tiny_dirs.get(kind, kind)
    # MeanFlow's student starts as the teacher, so its r = s share has zero loss at the first update: with a batch of
    # 2 that can be the whole batch (and the student rightly does not move); the contract draws r < s only
    args = {**FAST, "flow_matching_ratio": 0.0} if method == "meanflow" else FAST
    cfg = make_config(method, teacher, args=args, model={"timesteps": two_steps(teacher)},
                      train={"batch_size": 2, "steps": 12}, data={"prompts": PROMPTS, "real": "digits"})
    if (method, kind) == ("meanflow", "sana"):  # SANA's time embedding (AdaLayerNormSingle) has no second-time slot
        with pytest.raises(ConfigError, match="SanaTransformer2DModel cannot take"):
            Trainer(cfg)
        return
    trainer = Trainer(cfg)
    seen = check_steps(trainer, steps_to_see_every_role(trainer))
    assert seen == set(trainer.method.needs.roles)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_config_round_trips_through_yaml(method: str) -> None:
    cfg = parse_config({"method": method})
    again = parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg
    assert type(again.method_args) is METHODS[method].config_class


@pytest.mark.parametrize(("student_rank", "rank"), [(None, 0), (None, 4), (4, 4)])
@pytest.mark.parametrize("method", sorted(m for m, cls in METHODS.items()
                                          if "critic" in cls.needs(cls.config_class()).roles))
@pytest.mark.parametrize("kind", ["sd15", pytest.param("flux", marks=pytest.mark.slow)])
def test_contract_with_either_critic(method: str, student_rank: int | None, rank: int, kind: str,
                                     tiny_dirs: dict[str, str]) -> None:
    """Every critic method runs with a full-weight critic (rank 0) and with a LoRA critic on the teacher's own UNet,
    chosen by config alone; the LoRA critic trains only its adapter and shares the teacher's base weights. With a
    LoRA student too, all three roles are one UNet: the teacher's base with two adapters."""
    model = {"timesteps": [999], "critic_lora_rank": rank, "student_lora_rank": student_rank}
    trainer = Trainer(make_config(method, tiny_dirs[kind], args=FAST, model=model, data={"real": "digits"},
                                  train={"batch_size": 2, "steps": 12}))
    models = trainer.models
    base = models.teacher.denoiser.net
    assert (models.critic.net is base) == (rank > 0)
    assert (models.student.denoiser.net is base) == (student_rank is not None)
    tags = {"critic": ".critic." if rank else None, "student": ".student." if student_rank else None}
    for role, adapter in tags.items():
        own = list(trainable_state(models.trainable()[role]))
        assert own and all((adapter in n) if adapter else (".lora_" not in n) for n in own
                           if not any(head in n for head in ("gan_head", "scm_logvar"))), (role, own[:3])
    check_steps(trainer, steps_to_see_every_role(trainer))
