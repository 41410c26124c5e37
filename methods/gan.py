"""A discriminator head on the fake critic's bottleneck (DMD2, Yin et al. 2024, arXiv:2405.14867, Sec. 4.3).

The critic's own encoder is the discriminator's body: its bottleneck features of a noised image go through a small
trainable head to one logit per image. Checked against tianweiy/DMD2 ``main/sd_guidance.py`` (``cls_pred_branch``
on the UNet's mid-block output, ``compute_cls_logits`` running the fake UNet in ``classify_mode``, Diffusion-GAN
noise at t ~ U[0, T) on both real and fake inputs, losses softplus(f) + softplus(-r) for the head and
softplus(-f) for the generator).

The head is added to the critic module, so the critic's optimizer, checkpoints and (for a LoRA critic) the shared
base need nothing new. Only the encoder runs: a forward hook on the bottleneck stops the network there, as DMD2's
``classify_mode`` returns early.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_diffusion.denoiser import Cond, Denoiser
from distill_diffusion.errors import ConfigError
from distill_diffusion.flow_nets import TRANSFORMERS
from distill_diffusion.gmm import ResidualMLP


class _Features(Exception):  # noqa: N818 (a control-flow signal, not an error)
    def __init__(self, h: Tensor):
        super().__init__()
        self.h = h


def bottleneck(net: nn.Module) -> tuple[nn.Module, int, bool]:
    """(module whose output is the bottleneck, its channels, whether it is spatial) for the critic's network."""
    from diffusers import UNet2DConditionModel

    if isinstance(net, UNet2DConditionModel):
        return net.mid_block, net.config.block_out_channels[-1], True
    if isinstance(net, ResidualMLP):
        return net.body, net.out.in_features, False
    if type(net).__name__ in TRANSFORMERS:
        # the middle joint block's image tokens (B, N, D): SD3-Turbo's LADD reads transformer-block features; DMD2's
        # choice for a UNet, the bottleneck, has no transformer counterpart, so the middle of the stack stands in
        blocks = net.transformer_blocks
        width = net.config.num_attention_heads * net.config.attention_head_dim
        return blocks[(len(blocks) - 1) // 2], width, False
    raise ConfigError(f"no GAN head for a critic network of type {type(net).__name__}; supported: "
                      "UNet2DConditionModel, SD3 / Flux / SANA / Qwen-Image transformers, the mixture's ResidualMLP")


class GANHead(nn.Module):
    """Bottleneck features -> one logit per image (conv, GroupNorm, SiLU, 1x1 conv, spatial mean; or an MLP, on
    tokens averaged over the image)."""

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        if spatial:
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
            self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                      nn.SiLU(), nn.Conv2d(channels, 1, 1))
        else:
            self.body = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, h: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        if isinstance(h, tuple):  # a transformer block's (text tokens, image tokens): the image tokens (B, N, D)
            h = h[1]
        return self.body(h.float()).flatten(1).mean(1)


def attach_head(critic: Denoiser, seed: int) -> GANHead:
    """Create the head (seeded) as ``critic.gan_head``, so it trains, saves and loads with the critic."""
    _, channels, spatial = bottleneck(critic.net)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        critic.gan_head = GANHead(channels, spatial)
    return critic.gan_head


def logits(critic: Denoiser, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """The head's logit for each noised image: the critic's encoder up to its bottleneck, then the head."""
    module, _, _ = bottleneck(critic.net)

    def stop(_module: nn.Module, _inputs: object, output: Tensor) -> None:
        raise _Features(output)

    handle = module.register_forward_hook(stop)
    try:
        critic(x_t, t, cond)
    except _Features as f:
        return critic.gan_head(f.h)
    finally:
        handle.remove()
    raise RuntimeError("the critic's bottleneck never ran")
