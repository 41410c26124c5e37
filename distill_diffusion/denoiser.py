"""One calling convention for every network: ``denoiser(x_t, t, cond) -> x0_hat``.

Like k-diffusion's ``external.py`` wrappers: whatever the wrapped network predicts (epsilon, v, x0, flow velocity),
the adapter returns x0 through the teacher's `NoiseProcess`, so methods never look at ``prediction_type``.
`Cond` carries everything a network is conditioned on, and the unconditional counterpart used by classifier-free
guidance (CFG); methods never touch tokenizers or text encoders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from . import flow_nets, step_aware
from .process import NoiseProcess


@dataclass
class Cond:
    """Conditioning for one batch.

    embeds: prompt embeddings, ``encoder_hidden_states`` (B, L, D).
    pooled, time_ids: SDXL's ``added_cond_kwargs`` (``text_embeds`` (B, P) and ``time_ids`` (B, 6)).
    labels: class labels (B,) for class-conditional networks (``UNet2DModel`` class embedding, the mixture teacher);
        -1 means "no class" (the unconditional branch of the mixture teacher).
    cfg_scale: (B,) the CFG scale w a student that reads its scale is given (Imagen convention, 1 = none; embedded
        as ``w - 1`` like diffusers' LCM and SD pipelines do); networks without a CFG embedding, the teacher among
        them, ignore it.
    mask: (B, L) the attention mask of ``embeds`` (1 = a token, 0 = padding) for networks that read one (SANA's
        ``encoder_attention_mask``); None for networks that attend to every token.
    guidance: (B,) the distilled guidance a network embeds as an input (Flux.1-dev's ``guidance``; the pipeline's
        ``guidance_scale``), given alike to teacher, student and critic; None for networks without one.
    end_timestep: (B,) for a flow-map student (two times, `with_end_time`): the teacher timestep its step ends at
        (`process.CLEAN` for clean data); it embeds the interval ``t - end_timestep``. None: the step ends where it
        starts (the instantaneous velocity, what the teacher predicts); networks without the embedding ignore it.
    student_step: (B,) for a step-aware critic (`distill_diffusion.step_aware`): the index of the student step that
        produced each sample; denoisers without a step embedding ignore it.
    uncond: the same fields for the null prompt / null class, batch-aligned; classifier-free guidance uses it.
    """

    embeds: Tensor | None = None
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    labels: Tensor | None = None
    cfg_scale: Tensor | None = None
    mask: Tensor | None = None
    guidance: Tensor | None = None
    end_timestep: Tensor | None = None
    student_step: Tensor | None = None
    uncond: Cond | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    @property
    def batch_size(self) -> int:
        return len(next(iter(self._tensors().values())))

    def map(self, fn: Any) -> Cond:
        """Apply ``fn`` to every tensor, the unconditional branch included."""
        out = {k: fn(v) for k, v in self._tensors().items()}
        return replace(self, **out, uncond=None if self.uncond is None else self.uncond.map(fn))

    def __getitem__(self, index: Any) -> Cond:
        return self.map(lambda v: v[index])

    def where(self, mask: Tensor, other: Cond) -> Cond:
        """Rows of ``other`` where ``mask`` (B,) is true, rows of self elsewhere; the unconditional branch is kept."""
        theirs = other._tensors()
        out = {}
        for k, v in self._tensors().items():
            if k not in theirs:  # e.g. a student's CFG scale, which the null prompt does not carry
                continue
            m = mask.to(v.device).reshape(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(m, theirs[k], v)
        return replace(self, **out)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        def move(v: Tensor) -> Tensor:
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return self.map(move)

    def repeat(self, n: int) -> Cond:
        """Each row repeated n times in place (row i becomes rows i*n .. i*n+n-1)."""
        return self.map(lambda v: v.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        first = conds[0]
        keys = set(first._tensors())
        if any(set(c._tensors()) != keys for c in conds):
            raise ValueError("Cond.cat needs the same fields in every Cond (e.g. labels=-1 for the null class)")
        out = {k: torch.cat([c._tensors()[k] for c in conds]) for k in first._tensors()}
        uncond = None if first.uncond is None else Cond.cat([c.uncond for c in conds])
        return replace(first, **out, uncond=uncond)


class Denoiser(nn.Module):
    """``denoiser(x_t, t, cond) -> x0_hat`` around a diffusers model or a module of this package.

    Supported networks: ``UNet2DConditionModel`` (SD 1.x / 2.x, SDXL through ``cond.pooled`` / ``cond.time_ids``),
    ``UNet2DModel`` (class labels through ``cond.labels``), the flow-matching transformers of SD3 / SD3.5 and Flux.1
    (`distill_diffusion.flow_nets`), and any module with ``net(x_t, t, cond) -> prediction``.
    """

    def __init__(self, net: nn.Module, process: NoiseProcess, prediction_type: str | None = None):
        super().__init__()
        self.net = net
        self.process = process
        self.prediction_type = prediction_type or process.prediction_type

    def raw(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The wrapped network's own output (its native prediction)."""
        from diffusers import UNet2DConditionModel, UNet2DModel

        net = self.net
        param = next(iter(net.parameters()), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else x_t.dtype
        x_in = x_t.to(dtype)
        if isinstance(net, UNet2DConditionModel):
            added = None
            if cond.pooled is not None:
                added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
            w_embed = None
            if cond.cfg_scale is not None and net.config.time_cond_proj_dim is not None:
                w_embed = cfg_embedding(cond.cfg_scale, net.config.time_cond_proj_dim).to(dtype)
            interval = None  # a flow-map student's second time, through diffusers' own timestep class embedding
            if net.config.class_embed_type == "timestep":
                interval = end_interval(t, cond)
            return net(x_in, t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added,
                       timestep_cond=w_embed, class_labels=interval).sample
        if isinstance(net, UNet2DModel):
            return net(x_in, t, class_labels=cond.labels).sample
        if flow_nets.is_flow_transformer(net):
            return flow_nets.call(net, x_in, t, cond, dtype)
        return net(x_in, t, cond)

    @property
    def renoise_from_global_rng(self) -> bool:
        """Whether the network's pipeline re-noises from torch's global generator (it calls ``scheduler.step``
        without ``generator``: SD3's and Flux's do)."""
        return type(self.net).__name__ in flow_nets.GLOBAL_RNG_RENOISE

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator],
              like: Tensor) -> Tensor:
        """Fresh standard normal noise for a sampler's re-noising, drawn as the network's own pipeline draws it."""
        return flow_nets.fresh_noise(self.net, tuple(shape), generator, like)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        t = _as_batch(t, x_t)
        with step_aware.reading_step(self, cond):
            return self.process.to_x0(self.raw(x_t, t, cond), x_t, t, self.prediction_type)


def end_interval(t: Tensor, cond: Cond) -> Tensor:
    """A flow-map student's interval ``t - end_timestep`` in timesteps (B,), float32; 0 where no end is given."""
    if cond.end_timestep is None:
        return torch.zeros(len(t), device=t.device, dtype=torch.float32)
    return (t - cond.end_timestep.to(t.device)).to(torch.float32)


def cfg_embedding(w: Tensor, dim: int) -> Tensor:
    """(B, dim) sinusoidal embedding of the CFG scale ``w`` (Imagen convention) as a w-conditioned UNet reads it
    through ``time_cond_proj_dim``: of ``w - 1``, times 1000, sines then cosines, as diffusers' pipelines compute it
    (``get_guidance_scale_embedding``, after the VDM / LCM code), so an export samples what the student learned."""
    w = (w.to(torch.float32) - 1) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def cfg_x0(denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: Cond, cfg_scale: float | Tensor = 1.0) -> Tensor:
    """Classifier-free guidance in x0 space (Ho & Salimans 2022), Imagen convention: 1 means no guidance.

    ``x0_u + w (x0_c - x0_u)``; x0, epsilon and v are affine in each other at fixed (x_t, t), so this equals guiding
    the native prediction. Both branches run as one batch. ``cfg_scale`` may be a (B,) tensor: one scale per sample
    (guidance-range training, LCM and guided progressive distillation).
    """
    if not isinstance(cfg_scale, Tensor) and cfg_scale == 1.0:
        return denoiser(x_t, t, cond)
    if cond.uncond is None:
        raise ValueError("classifier-free guidance needs cond.uncond (the null-prompt conditioning)")
    t = _as_batch(t, x_t)
    both = Cond.cat([replace(cond.uncond, uncond=None, cfg_scale=None), replace(cond, uncond=None, cfg_scale=None)])
    x0_u, x0_c = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
    if isinstance(cfg_scale, Tensor):
        cfg_scale = cfg_scale.to(x0_c.dtype).reshape(-1, *([1] * (x0_c.ndim - 1)))
    return x0_u + cfg_scale * (x0_c - x0_u)


def _as_batch(t: Tensor | float | int, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t
