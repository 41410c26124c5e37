"""scikit-learn's handwritten digits (1797 images of 8x8, UCI) as the embedded teacher's training set.

Images are upsampled to 32x32 (bilinear) and split once, stratified and seeded, into train and held-out parts shared
by the teacher, the digits classifier and the evaluation's reference statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 32
TEACHER_SIZE = 16  # the embedded teacher's image size in pixels (its latents are 8x8x4)


def prompt_for(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


PROMPTS = tuple(prompt_for(k) for k in range(10))


def label_of_prompt(prompt: str) -> int:
    """The digit a prompt asks for (-1 when it names none)."""
    words = prompt.lower().split()
    for k, w in enumerate(DIGIT_WORDS):
        if w in words:
            return k
    return -1


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1797 digits as grayscale floats in [0, 1], shape (N, 1, size, size), with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def split(n: int, held_out: float = 0.2, seed: int = 0, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Stratified train / held-out index split (same every time for the same arguments)."""
    gen = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=gen)
        k = int(round(n * held_out))
        return perm[k:], perm[:k]
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(len(idx) * held_out))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits_split(size: int = IMAGE_SIZE) -> dict[str, tuple[Tensor, Tensor]]:
    x, y = load_digits_images(size)
    tr, te = split(len(x), labels=y)
    return {"train": (x[tr], y[tr]), "test": (x[te], y[te])}


def shift_augment(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Random integer translations of up to ``max_shift`` pixels (zero fill), one per image."""
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def to_rgb(x: Tensor) -> Tensor:
    """Gray (B, 1, H, W) in [0, 1] -> RGB in [-1, 1], Stable Diffusion's pixel range (how the teacher was trained)."""
    return (x * 2 - 1).repeat(1, 3, 1, 1)


def to_gray(images: Tensor) -> Tensor:
    """(B, C, H, W) floats in [0, 1] or uint8 (B, H, W, C) -> (B, 1, H, W) floats in [0, 1]."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float() / 255.0
    return images.mean(1, keepdim=True) if images.shape[1] > 1 else images
