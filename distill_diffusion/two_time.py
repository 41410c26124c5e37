"""A second time input for flow-map students (MeanFlow, Geng et al. 2025, arXiv:2505.13447): the network reads where
its step ends, as the interval ``t - end_timestep`` in the teacher's timesteps (MeanFlow's (t, t - r) conditioning,
its Table 1c), through an embedding added to its own time embedding whose last layer starts at zero, so at
initialisation the student computes exactly what the teacher computes.

- ``UNet2DConditionModel`` (SD 1.5 / 2.1 / SDXL): diffusers' own ``class_embed_type="timestep"`` (the interval through
  the UNet's sinusoidal projection and a ``TimestepEmbedding``, added to the time embedding), so the weights load in
  a stock UNet; the caller passes the interval as ``class_labels``.
- SD3 / SD3.5 and Flux.1 transformers: no stock slot, so a ``TimestepEmbedding`` of the interval is added to the
  output of the transformer's ``time_text_embed`` (new keys ``time_text_embed.end_time_embed.*``; every other key
  unchanged).
- the mixture's `ResidualMLP`: noise-angle features of the end time through a zero-initialised layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .teachers import unet_with_config

PROJ_DIM = 256  # the sinusoidal width every diffusers time embedding of these families uses


def with_end_time(net: Any) -> Any:
    """``net`` (a copy of it for a UNet) reading a second time, identical to ``net`` at initialisation."""
    from diffusers import UNet2DConditionModel

    from .gmm import ResidualMLP

    if isinstance(net, UNet2DConditionModel):
        return _unet_with_end_time(net)
    if isinstance(net, ResidualMLP):
        net.add_end_time()
        return net
    if hasattr(net, "time_text_embed") and hasattr(net.time_text_embed, "timestep_embedder"):
        _add_end_time_embedding(net.time_text_embed)
        return net
    raise ConfigError(f"a flow-map student needs a second time input, which {type(net).__name__} cannot take; "
                      "supported: UNet2DConditionModel, SD3 / Flux transformers, the mixture MLP")


def reads_end_time(net: Any) -> bool:
    """Whether ``net`` has a second time input (`with_end_time`)."""
    config = getattr(net, "config", None)
    if config is not None and getattr(config, "class_embed_type", None) == "timestep":
        return True
    embed = getattr(net, "time_text_embed", None)
    return hasattr(embed, "end_time_embed") or getattr(net, "end_time", None) is not None


def _unet_with_end_time(unet: Any) -> Any:
    if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
        raise ConfigError(f"this UNet already has a class embedding ({unet.config.class_embed_type}); a flow-map "
                          "student reads its second time through that slot")
    plain = unet_with_config(unet, class_embed_type="timestep")
    missing, unexpected = plain.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or not all(k.startswith("class_embedding.") for k in missing):
        raise RuntimeError(f"UNet does not fit a second time embedding: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        plain.class_embedding.linear_2.weight.zero_()
        plain.class_embedding.linear_2.bias.zero_()
    return plain.to(unet.device, unet.dtype).train(unet.training)


_CLASSES: dict[type, type] = {}


def _add_end_time_embedding(embed: nn.Module) -> None:
    """Turn a transformer's ``time_text_embed`` into one that adds an embedding of ``embed.interval`` (set by the
    caller around each forward, `flow_nets.call`) to its output."""
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps

    base = type(embed)
    if base not in _CLASSES:
        _CLASSES[base] = type(f"EndTime{base.__name__}", (base,), {"forward": _forward_with_end_time})
    dim = embed.timestep_embedder.linear_2.out_features
    ref = embed.timestep_embedder.linear_1.weight
    embed.end_time_proj = Timesteps(PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
    embed.end_time_embed = TimestepEmbedding(PROJ_DIM, dim).to(ref.device, ref.dtype)
    with torch.no_grad():
        embed.end_time_embed.linear_2.weight.zero_()
        embed.end_time_embed.linear_2.bias.zero_()
    embed.interval = None
    embed.__class__ = _CLASSES[base]


def _forward_with_end_time(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    out = super(type(self), self).forward(*args, **kwargs)
    if self.interval is None:
        return out
    proj = self.end_time_proj(self.interval.to(out.device)).to(out.dtype)
    return out + self.end_time_embed(proj)
