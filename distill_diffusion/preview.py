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
from .data import first_prompts
from .denoiser import Cond
from .eval.mixture import mixture_metrics, unconditional_metrics
from .latents import decode
from .roles import Models

PREVIEW_SEED = 1234


@torch.no_grad()
def student_samples(models: Models, cond: Cond, n: int, seed: int = PREVIEW_SEED) -> Tensor:
    device = next(models.student.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(n, *models.sample_shape, generator=gen, device=device)
    return models.student.sample(noise, cond.to(device), gen)


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
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = models.student.training
    models.student.eval()
    try:
        if models.family == "gmm":
            mixture = models.mixture
            labels = mixture.balanced_labels(cfg.train.eval_samples)
            if not mixture.conditional:  # drawn with the null class; scored by nearest class and class shares
                x = student_samples(models, Cond(labels=torch.full_like(labels, -1)), len(labels))
                metrics = unconditional_metrics(x, mixture)
                labels = mixture.nearest(x)
                scatter(x, labels, out_dir / "samples.png", f"ED={metrics['energy_distance']:.4f} "
                        f"share_error={metrics['share_error']:.3f}")
                return metrics
            x = student_samples(models, Cond(labels=labels), len(labels))
            metrics = mixture_metrics(x, labels, mixture)
            scatter(x, labels, out_dir / "samples.png",
                    " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            return metrics
        prompts = first_prompts(cfg.data, 8)
        latents = student_samples(models, models.text.encode(prompts), len(prompts))
        image_grid(decode(models, latents), cols=len(prompts)).save(out_dir / "grid.png")
        return {}
    finally:
        models.student.train(was_training)
