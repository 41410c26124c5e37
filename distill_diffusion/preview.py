"""What a run shows while and after it trains: known-answer metrics for the mixture, image grids otherwise.

Previews use fixed noise (their own seed), so grids and metrics of different steps and runs compare like for like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .config import Config
from .data import read_prompts
from .denoiser import Cond
from .roles import Models

PREVIEW_SEED = 1234


@torch.no_grad()
def student_samples(models: Models, cond: Cond, n: int, seed: int = PREVIEW_SEED) -> Tensor:
    device = next(models.student.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, *models.sample_shape, generator=gen, device=device)
    return models.student.sample(noise, cond.to(device), gen)


def _latent_stats(vae: torch.nn.Module, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
    """Per-channel latent mean / std of SDXL-family VAEs that standardise latents (0 and 1 otherwise)."""
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return 0.0, 1.0
    return torch.tensor(mean).view(1, -1, 1, 1).to(like), torch.tensor(std).view(1, -1, 1, 1).to(like)


@torch.no_grad()
def decode(models: Models, latents: Tensor, as_float: bool = False) -> np.ndarray:
    """Latents -> images (B, H, W, 3) through the teacher's VAE with diffusers' own arithmetic: uint8, or floats in
    [0, 1] as a pipeline's ``output_type="np"`` gives them."""
    vae = models.vae
    mean, std = _latent_stats(vae, latents)
    latents = latents * std / vae.config.scaling_factor + mean
    images = (vae.decode(latents.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)
    images = images.permute(0, 2, 3, 1).cpu().numpy()
    return images if as_float else (images * 255).round().astype(np.uint8)


@torch.no_grad()
def encode(models: Models, images: Tensor, batch: int = 64) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> the teacher's latents (posterior means, scaled as `decode` unscales)."""
    vae = models.vae
    device = next(vae.parameters()).device
    latents = torch.cat([vae.encode(images[i : i + batch].to(device, vae.dtype)).latent_dist.mean.float()
                         for i in range(0, len(images), batch)])
    mean, std = _latent_stats(vae, latents)
    return (latents - mean) * vae.config.scaling_factor / std


def image_grid(images: np.ndarray, cols: int) -> Image.Image:
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = img
    return Image.fromarray(grid)


def scatter(samples: Tensor, labels: Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    x = samples.float().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], c=labels.cpu().numpy(), s=2, cmap="tab10")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def preview(models: Models, cfg: Config, out_dir: Path) -> dict[str, float]:
    """Write samples of the current student under ``out_dir``; return known-answer metrics where there are some."""
    from distill_diffusion.eval.mixture import mixture_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = models.student.training
    models.student.eval()
    try:
        if models.family == "gmm":
            mixture = models.mixture
            labels = mixture.balanced_labels(cfg.train.eval_samples)
            x = student_samples(models, Cond(labels=labels), len(labels))
            metrics = mixture_metrics(x, labels, mixture)
            scatter(x, labels, out_dir / "samples.png",
                    " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            return metrics
        prompts = read_prompts(cfg.data)[:8]
        latents = student_samples(models, models.text.encode(prompts), len(prompts))
        image_grid(decode(models, latents), cols=len(prompts)).save(out_dir / "grid.png")
        return {}
    finally:
        models.student.train(was_training)
