"""A critic that knows which student step produced its sample (issue 27; TDM, Luo et al. 2025, arXiv:2503.06674).

A multi-step student trained by distribution matching with backward simulation (DMD2 Sec. 4.5) feeds its critic
samples from a random step of its own sampler. One critic for all of them models the *mixture* of the per-step output
distributions, and distribution matching then drives that mixture, not each step, to the data: the steps drift apart
with offsets that cancel (`docs/BENCHMARKS.md`, "Multi-step DMD2 on the mixture"). A step-aware critic fits one
distribution per step, so each step's samples are pushed to the data on their own.

TDM's code (Luo-Yihong/TDM ``train_tdm_demo.py``) keeps one unconditioned fake score and makes it step-aware through
time instead: each step's samples are noised only inside that step's own interval (``--use_separate``;
`distill_diffusion.methods.score` ``step_times: own``); its README suggests adding the step as a condition of the fake
score when the noise of every step spans the whole range, which is what this module does (``critic_steps:
conditioned``).

The step enters as a learned embedding (one row per student step) added to the output of the network's own time
embedding, the way diffusers adds a class embedding to a UNet's time embedding; its rows start at zero, so the critic
starts as exactly the network it was copied from. The embedding belongs to the critic `Denoiser` (like the GAN head,
`methods/gan.py`), not to the network, so a LoRA critic on the teacher's shared network adds it only to its own calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError


def time_embedding(net: nn.Module) -> tuple[nn.Module, int]:
    """(the module whose (B, width) output is the network's time embedding, width) for ``net``."""
    embed = getattr(net, "time_embedding", None)  # UNet2DConditionModel; the mixture MLP names its input layer so
    if isinstance(embed, nn.Linear):
        return embed, embed.out_features
    if embed is not None and hasattr(embed, "linear_2"):
        return embed, embed.linear_2.out_features
    embed = getattr(net, "time_text_embed", None)  # SD3 / SD3.5, Flux.1, Qwen-Image: (B, inner_dim)
    if embed is not None and hasattr(embed, "timestep_embedder"):
        return embed, embed.timestep_embedder.linear_2.out_features
    embed = getattr(net, "time_embed", None)  # SANA: AdaLayerNormSingle (its .emb) or SANA-Sprint's guidance embedding
    embed = getattr(embed, "emb", embed)
    if embed is not None and hasattr(embed, "timestep_embedder"):  # what the size / guidance embeddings are added to
        return embed.timestep_embedder, embed.timestep_embedder.linear_2.out_features
    raise ConfigError(f"a step-aware critic (critic_steps: conditioned) adds its step to the network's time "
                      f"embedding, which {type(net).__name__} does not expose; supported: UNet2DConditionModel, SD3 / "
                      f"Flux / SANA / Qwen-Image transformers, the mixture MLP; or use step_times: own")


class StepEmbedding(nn.Module):
    """One row per student step, added to the time embedding; zero at initialisation."""

    def __init__(self, steps: int, width: int):
        super().__init__()
        self.table = nn.Embedding(steps, width)
        nn.init.zeros_(self.table.weight)

    def forward(self, step: Tensor) -> Tensor:
        return self.table(step.long())


def attach(critic: nn.Module, steps: int) -> StepEmbedding:
    """Create ``critic.step_embed`` for a student of ``steps`` steps (it trains, saves and loads with the critic)."""
    if steps < 2:
        raise ConfigError(f"a step-aware critic needs a multi-step student, got {steps} step(s)")
    _, width = time_embedding(critic.net)
    critic.step_embed = StepEmbedding(steps, width)
    return critic.step_embed


@contextmanager
def reading_step(denoiser: nn.Module, cond: Any) -> Iterator[None]:
    """While the body runs, ``denoiser``'s network adds ``denoiser.step_embed(cond.student_step)`` to its time
    embedding; a denoiser without the embedding, or a ``cond`` without a step, runs unchanged."""
    embed = getattr(denoiser, "step_embed", None)
    step = getattr(cond, "student_step", None)
    if embed is None or step is None:
        yield
        return
    module, _ = time_embedding(denoiser.net)

    def add(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        return output + embed(step.to(output.device)).to(output.dtype)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def with_student_step(cond: Any, step: int | Tensor, batch: int) -> Any:
    """``cond`` (and its null-prompt branch, which classifier-free guidance batches with it) carrying the student
    step ``step`` that produced each of ``batch`` samples."""
    device = next(iter(cond._tensors().values())).device
    steps = step.to(device) if isinstance(step, Tensor) else torch.full((batch,), int(step), device=device)
    uncond = None if cond.uncond is None else replace(cond.uncond, student_step=steps)
    return replace(cond, student_step=steps, uncond=uncond)
