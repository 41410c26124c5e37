"""The plugin interface every method implements, and the config fields the trainer reads from every method.

A method declares what it needs of assembly (`Method.needs`: its critic, how its student samples, real images), says
which role updates at a step (`phase`) and what that role's loss is (`loss`). It never sees an accelerator, a device,
an optimizer, a logger or a file: the trainer owns those.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from distill_diffusion import draws
from distill_diffusion.denoiser import Cond
from distill_diffusion.errors import ConfigError
from distill_diffusion.lora import own_parameters
from distill_diffusion.process import NoiseProcess
from distill_diffusion.roles import Batch, Models, Needs


@dataclass
class MethodConfig:
    """Optimizer settings per role; each method overrides the defaults with its paper's."""

    lr_student: float = 1e-5
    lr_critic: float = 1e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.lr_student <= 0 or self.lr_critic <= 0:
            raise ConfigError(f"learning rates must be > 0, got lr_student={self.lr_student}, "
                              f"lr_critic={self.lr_critic}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")
        if self.weight_decay < 0 or self.adam_eps <= 0:
            raise ConfigError("weight_decay must be >= 0 and adam_eps > 0")


class Method(ABC):
    """Base class: ``needs(cfg) -> Needs``, ``phase(step) -> role`` and ``loss(phase, batch, generator) ->
    (loss, logs)``. ``generator`` is always the random number generator (a ``torch.Generator``)."""

    config_class: type[MethodConfig] = MethodConfig

    def __init__(self, cfg: MethodConfig, models: Models):
        self.cfg = cfg
        self.models = models
        self.needs = type(self).needs(cfg)

    @classmethod
    def needs(cls, cfg: MethodConfig) -> Needs:
        """What this method needs of assembly (`distill_diffusion.roles.Needs`); default: a student alone."""
        return Needs()

    def phase(self, step: int) -> str:
        return "student"

    @abstractmethod
    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss of role ``phase`` on ``batch`` at train step ``step``, and a dict of floats to log."""

    def lr(self, role: str) -> float:
        return {"student": self.cfg.lr_student, "critic": self.cfg.lr_critic}[role]

    def lr_at(self, role: str, step: int) -> float:
        """The learning rate of ``role`` at train step ``step`` (constant unless a method schedules it)."""
        return self.lr(role)

    def after_update(self, phase: str, step: int) -> None:
        """Called once the optimizer of role ``phase`` has stepped (e.g. to move an EMA target); default: nothing."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors the method keeps outside the roles (an EMA target, a round's teacher), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what `state_dict` returned (resume)."""
        return None


def noised(process: NoiseProcess, x: Tensor, lo: float, hi: float, generator: torch.Generator, shift: float = 1.0
           ) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, eps): x noised at t uniform over the fractions [lo, hi] of training time (shifted on a flow path:
    `NoiseProcess.sample_timesteps`; t drawn first, then eps); x_t keeps x's graph."""
    t = process.sample_timesteps(len(x), lo, hi, generator, shift=shift)
    eps = draws.randn(x.shape, generator, x)
    return process.add_noise(x, eps, t), t, eps


def noised_groups(process: NoiseProcess, x: Tensor, groups: int | Tensor,
                  bounds: Callable[[int], tuple[float, float]], generator: torch.Generator, shift: float = 1.0
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """`noised` where the range of t depends on each row's group (a student step): ``bounds(g)`` gives the fractions
    [lo, hi] for group g; ``groups`` an int (every row in it: exactly `noised`) or a (B,) tensor."""
    if isinstance(groups, int):
        return noised(process, x, *bounds(groups), generator, shift)
    t = None
    for g in groups.unique().tolist():
        rows = groups == g
        t_g = process.sample_timesteps(int(rows.sum()), *bounds(int(g)), generator, shift=shift)
        if t is None:
            t = torch.empty(len(x), dtype=t_g.dtype, device=t_g.device)
        t[rows.to(t.device)] = t_g
    eps = draws.randn(x.shape, generator, x)
    return process.add_noise(x, eps, t), t, eps


def default_student_cfg(cfg: MethodConfig) -> float:
    """The CFG scale a student that reads its scale samples, evaluates and exports at: the method's ``student_cfg``,
    else its ``teacher_cfg`` (the low end of its range)."""
    return float(cfg.student_cfg if cfg.student_cfg is not None else cfg.teacher_cfg)


def draw_cfg_scales(lo: float, hi: float | None, n: int, generator: torch.Generator) -> Tensor | float:
    """CFG scales for n samples: ``lo`` when there is no range, else w ~ U[lo, hi] per sample (LCM's w range)."""
    if hi is None or hi == lo:
        return lo
    return lo + (hi - lo) * draws.rand(n, generator)


def student_cond(student: torch.nn.Module, cond: Cond, w: Tensor | float) -> Cond:
    """``cond`` carrying the scales ``w`` when the student reads its CFG scale, else unchanged."""
    if not student.reads_cfg:
        return cond
    device = cond.embeds.device if cond.embeds is not None else cond.labels.device
    w = w.to(device) if isinstance(w, Tensor) else torch.full((cond.batch_size,), float(w), device=device)
    return replace(cond, cfg_scale=w)


class AlternatingMethod(Method):
    """A student and a critic updated in the ratio ``cfg.critic_updates`` : 1 (the score family's fake critic, an
    adversarial method's discriminator); subclasses give `student_loss` and `critic_loss`. The config needs
    ``critic_updates`` and ``backward_simulation``."""

    @classmethod
    def needs(cls, cfg: MethodConfig) -> Needs:
        return Needs(critic="copy")

    def phase(self, step: int) -> str:
        """``critic_updates`` critic steps, then one student step (DMD2's two time-scale rule; 1:1 in SiD, VSD)."""
        return "student" if step % (self.cfg.critic_updates + 1) == self.cfg.critic_updates else "critic"

    def loss(self, phase: str, batch: Batch, generator: torch.Generator, step: int = 0
             ) -> tuple[Tensor, dict[str, float]]:
        if phase == "student":
            return self.student_loss(batch, generator)
        if phase == "critic":
            return self.critic_loss(batch, generator)
        raise ValueError(f"unknown phase {phase!r}; choose one of: student, critic")

    @abstractmethod
    def student_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The student's loss."""

    @abstractmethod
    def critic_loss(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """The critic's loss."""

    def student_sample(self, batch: Batch, generator: torch.Generator, grad: bool) -> Tensor:
        """x = G(input): at a random step of the student's sampler when it has several (backward simulation,
        tianweiy/DMD2 ``main/sd_unified_model.py`` ``sample_backward``), so training sees the inputs inference sees."""
        return self.sample_step(batch, generator, grad)[0]

    def draw_step(self, batch: Batch, generator: torch.Generator) -> int | Tensor:
        """The student step the batch's samples come from: one random step for the batch with backward simulation,
        else 0 (a method may give one per row, as a (B,) tensor)."""
        steps = len(self.models.student.timesteps)
        if steps > 1 and self.cfg.backward_simulation:
            return int(torch.randint(0, steps, (1,), generator=generator, device=generator.device))
        return 0

    def sample_step(self, batch: Batch, generator: torch.Generator, grad: bool) -> tuple[Tensor, int | Tensor]:
        """`student_sample` and the index k of the student step that produced it (`draw_step`). The step's input
        (x_{t_k}, t_k) stays in ``student_input`` for a term that reads it (`ScoreMethod.trajectory_term`)."""
        student = self.models.student
        k = self.draw_step(batch, generator)
        x_in, t_in = student.rollout(batch.noise, batch.cond, k, generator)
        self.student_input = (x_in, t_in)
        with torch.set_grad_enabled(grad):
            return student(x_in, t_in, batch.cond), k


def param_state(module: torch.nn.Module, names: list[str], prefix: str) -> dict[str, Tensor]:
    """``module``'s parameters ``names`` as a flat state dict under ``prefix`` (for `Method.state_dict`)."""
    params = dict(module.named_parameters())
    return {f"{prefix}{k}": params[k] for k in names}


def load_param_state(module: torch.nn.Module, names: list[str], prefix: str, state: dict[str, Tensor]) -> None:
    """Copy what `param_state` wrote back into ``module``; a checkpoint missing one is refused in one line."""
    missing = [k for k in names if f"{prefix}{k}" not in state]
    if missing:
        raise ConfigError(f"checkpoint lacks {prefix}{missing[0]}; it was written by a run with another config")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k in names:
            params[k].copy_(state[f"{prefix}{k}"])


class EMATarget:
    """A method's target network theta^-: the online student itself (``decay`` 0) or an EMA copy of it (consistency
    models' target; LCM 0.95). The copy is made on first use, so it sits wherever the trainer has put the student;
    `state_dict` / `load_state_dict` carry it through checkpoints under ``target.``."""

    def __init__(self, student: torch.nn.Module, decay: float):
        self.student, self.decay = student, float(decay)
        self._names = list(own_parameters(student))
        self._copy: torch.nn.Module | None = None

    @property
    def net(self) -> torch.nn.Module:
        if self.decay == 0:
            return self.student
        if self._copy is None:
            self._copy = copy.deepcopy(self.student).requires_grad_(False).eval()
        return self._copy

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the student's current weights (after a student update)."""
        if self.decay == 0:
            return
        online, target = dict(self.student.named_parameters()), dict(self.net.named_parameters())
        for name in self._names:
            target[name].lerp_(online[name].detach().to(target[name].dtype), 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.decay == 0 else param_state(self.net, self._names, "target.")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.decay > 0:
            load_param_state(self.net, self._names, "target.", state)
