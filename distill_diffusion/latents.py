"""Images <-> the teacher's latents, through its VAE, with diffusers' own arithmetic (scaling factor, and the latent
mean / std of the SDXL-family VAEs that standardise latents), so training, previews and exports agree."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .roles import Models


def _latent_stats(vae: torch.nn.Module, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """Per-channel latent mean / std of SDXL-family VAEs that standardise latents; (shift_factor or 0, 1) otherwise."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:  # SD3 / Flux VAEs shift instead: (z - shift_factor) * scaling_factor
        return float(getattr(vae.config, "shift_factor", None) or 0.0), 1.0
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


def latent_channels(vae: torch.nn.Module) -> int:
    """Channels of the VAE's latents (Qwen-Image's video-style VAE calls them ``z_dim``)."""
    return int(vae.config.get("latent_channels") or vae.config["z_dim"])


def scaling_factor(vae: torch.nn.Module) -> float:
    """The VAE's latent scaling; 1 for VAEs that standardise by per-channel mean / std alone (Qwen-Image's)."""
    return float(vae.config.get("scaling_factor") or 1.0)


def _frames(vae: torch.nn.Module) -> bool:
    """Whether the VAE is a video one that takes (B, C, frames, H, W) (Qwen-Image's: images are one frame)."""
    return type(vae).__name__ == "AutoencoderKLQwenImage"


def _posterior_mean(encoded: object) -> Tensor:
    """The latent an encoder output stands for: AutoencoderKL's posterior mean, AutoencoderDC's (SANA) latent."""
    dist = getattr(encoded, "latent_dist", None)
    return (dist.mean if dist is not None else encoded.latent).float()


@torch.no_grad()
def decode(models: Models, latents: Tensor, as_float: bool = False) -> np.ndarray:
    """Latents -> images (B, H, W, 3) through the teacher's VAE: uint8, or floats in [0, 1] as a pipeline's
    ``output_type="np"`` gives them."""
    vae = models.vae
    mean, std = _latent_stats(vae, latents)
    latents = latents * std / scaling_factor(vae) + mean
    if _frames(vae):
        images = vae.decode(latents.to(vae.dtype).unsqueeze(2)).sample[:, :, 0]
    else:
        images = vae.decode(latents.to(vae.dtype)).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    return images if as_float else (images * 255).round().astype(np.uint8)


@torch.no_grad()
def encode(models: Models, images: Tensor, batch: int = 64) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> the teacher's latents (posterior means, scaled as `decode` unscales)."""
    return encode_vae(models.vae, images, batch)


@torch.no_grad()
def encode_vae(vae: torch.nn.Module, images: Tensor, batch: int = 64) -> Tensor:
    """`encode` with a VAE alone (latent caches are built without the rest of the run)."""
    device = next(vae.parameters()).device
    frames = _frames(vae)  # a video VAE: one frame in, one frame out

    def one(x: Tensor) -> Tensor:
        if frames:
            return _posterior_mean(vae.encode(x.unsqueeze(2)))[:, :, 0]
        return _posterior_mean(vae.encode(x))

    latents = torch.cat([one(images[i : i + batch].to(device, vae.dtype)) for i in range(0, len(images), batch)])
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) * scaling_factor(vae) / std
