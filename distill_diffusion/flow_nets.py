"""How the flow-matching transformers are called, so `Denoiser` can hide them behind ``denoiser(x_t, t, cond)``.

Every role sees latents as the VAE makes them, (B, C, H, W), and timesteps in the process's units (``t = 1000 s``
on the path ``x_t = (1 - s) x0 + s eps``). Each function here turns that into the network's own call, exactly as its
diffusers pipeline makes it (checked against diffusers 0.42 ``pipeline_stable_diffusion_3.py``,
``pipeline_flux.py`` and ``pipeline_sana.py``), so a student trained through it samples the same in the exported
pipeline:

- SD3 / SD3.5 (``SD3Transformer2DModel``): ``timestep = t`` in [0, 1000]; ``encoder_hidden_states`` the CLIP + T5
  sequence (``cond.embeds``), ``pooled_projections`` the two CLIP pooled outputs (``cond.pooled``).
- Flux.1 (``FluxTransformer2DModel``): latents packed into 2x2 patches, (B, H/2 * W/2, 4C); ``timestep = t / 1000``;
  ``img_ids`` the (row, column) position of each patch, ``txt_ids`` zeros; dev's distilled guidance as
  ``guidance = cond.guidance`` (the pipeline's ``guidance_scale``; the network multiplies it by 1000 itself).

- SANA (``SanaTransformer2DModel``): ``timestep = t * timestep_scale``; ``encoder_hidden_states`` the Gemma-2
  sequence with its ``encoder_attention_mask`` (``cond.mask``); a learned-sigma half of the output is dropped.
- Qwen-Image (``QwenImageTransformer2DModel``, ``pipeline_qwenimage.py``): latents packed as Flux's; ``timestep =
  t / 1000``; ``encoder_hidden_states`` the Qwen2.5-VL sequence with ``encoder_hidden_states_mask`` (``cond.mask``);
  ``img_shapes`` the (frames, rows, columns) of the packed grid, one frame.

The prediction is the flow velocity ``u = eps - x0`` for all four. Flux's and Qwen-Image's schedulers draw their
fresh noise in the packed layout; `fresh_noise` draws it the same way, so a multistep student re-noises as the
exported pipeline does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .draws import randn

TRANSFORMERS = ("SD3Transformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel",
                "QwenImageTransformer2DModel")
# pipelines that call ``scheduler.step`` without the user's generator (re-noising draws from torch's global one)
GLOBAL_RNG_RENOISE = ("SD3Transformer2DModel", "FluxTransformer2DModel", "QwenImageTransformer2DModel")
PACKED = ("FluxTransformer2DModel", "QwenImageTransformer2DModel")  # 2x2-packed latents


def is_flow_transformer(net: nn.Module) -> bool:
    return type(net).__name__ in TRANSFORMERS


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of `pack` for an (h, w) latent (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(h/2 * w/2, 3) position ids of the packed patches: (0, row, column) (``_prepare_latent_image_ids``)."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


def call(net: nn.Module, x: Tensor, t: Tensor, cond: Any, dtype: torch.dtype) -> Tensor:
    """The network's velocity prediction for latents ``x`` (B, C, H, W) at process timesteps ``t`` (B,); a flow-map
    student's (`two_time.with_end_time`) reads the interval to ``cond.end_timestep`` too."""
    embed = getattr(net, "time_text_embed", None)
    if not hasattr(embed, "end_time_embed"):
        return _call(net, x, t, cond, dtype)
    from .denoiser import end_interval

    embed.interval = end_interval(t, cond)
    try:
        return _call(net, x, t, cond, dtype)
    finally:
        embed.interval = None


def _call(net: nn.Module, x: Tensor, t: Tensor, cond: Any, dtype: torch.dtype) -> Tensor:
    t = t.to(torch.float32)
    embeds = cond.embeds.to(dtype)
    if type(net).__name__ == "SanaTransformer2DModel":
        out = net(x, encoder_hidden_states=embeds, encoder_attention_mask=cond.mask,
                  timestep=t * net.config.timestep_scale, return_dict=False)[0].float()
        return out.chunk(2, dim=1)[0] if net.config.out_channels // 2 == x.shape[1] else out  # learned sigma
    _, _, h, w = x.shape
    if type(net).__name__ == "QwenImageTransformer2DModel":
        out = net(hidden_states=pack(x), timestep=(t / 1000).to(x.dtype), encoder_hidden_states=embeds,
                  encoder_hidden_states_mask=cond.mask.long(), img_shapes=[[(1, h // 2, w // 2)]] * len(x),
                  return_dict=False)[0]
        return unpack(out, h, w)
    pooled = cond.pooled.to(dtype)
    if type(net).__name__ == "SD3Transformer2DModel":
        return net(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                   return_dict=False)[0]
    guidance = None
    if net.config.guidance_embeds:
        if cond.guidance is None:
            raise ValueError("this Flux transformer reads a guidance embedding (Flux.1-dev); cond.guidance is None")
        guidance = cond.guidance.to(torch.float32)
    out = net(hidden_states=pack(x), encoder_hidden_states=embeds, pooled_projections=pooled,
              timestep=(t / 1000).to(x.dtype), guidance=guidance,
              img_ids=image_ids(h, w, x.device, x.dtype), txt_ids=x.new_zeros(embeds.shape[1], 3),
              return_dict=False)[0]
    return unpack(out, h, w)


def size_arguments(pipe: Any, size: int) -> dict[str, Any]:
    """Pipeline call arguments for square images of ``size``: height and width, and for SANA, whose pipeline snaps
    sizes to its aspect-ratio bins, the switch that turns the binning off."""
    extra: dict[str, Any] = {"height": size, "width": size}
    if type(pipe).__name__ == "SanaPipeline":
        extra["use_resolution_binning"] = False
    return extra


def fresh_noise(net: nn.Module, shape: tuple[int, ...], generator: Any, like: Tensor) -> Tensor:
    """Standard normal noise of ``shape`` (B, C, H, W), drawn in the layout the network's scheduler draws it."""
    if type(net).__name__ not in PACKED:
        return randn(shape, generator, like)
    b, c, h, w = shape
    return unpack(randn((b, (h // 2) * (w // 2), 4 * c), generator, like), h, w)
