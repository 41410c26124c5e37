"""The digits classifier: the feature space for FID on the embedded teacher and the prompt-accuracy judge.

A small CNN on 32x32 grayscale digits, trained by `train_classifier` on the stratified training split with random
shifts; the shipped weights are what that function produced (seeded). ``features(x)`` is the 128-d penultimate
layer used as the FID feature space; ``forward`` gives logits.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .digits_data import IMAGE_SIZE, digits_split, shift_augment, to_gray

FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, FEATURE_DIM, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """Any RGB/gray image batch (float in [0, 1] NCHW, or uint8 NHWC) -> (B, 1, 32, 32) in [-1, 1]."""
        x = to_gray(images).float()
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images).to(next(self.parameters()).device))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: Tensor, batch: int = 512) -> Tensor:
        self.eval()
        return torch.cat([self(images[i : i + batch]).argmax(1).cpu() for i in range(0, len(images), batch)])


def train_classifier(out: str | Path | None = None, epochs: int = 30, seed: int = 0,
                     progress: bool = True) -> tuple[DigitsClassifier, dict[str, float]]:
    """Train on the training split (random 2-pixel shifts), report held-out accuracy; save if ``out`` is given."""
    t0 = time.time()
    data = digits_split()
    (x, y), (xt, yt) = data["train"], data["test"]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in tqdm(range(epochs), desc="digits classifier", disable=not progress):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - 63, 64):
            idx = perm[i : i + 64]
            xb = shift_augment(x[idx], 2, gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = (model.predict(xt) == yt).float().mean().item()
    stats = {"held_out_accuracy": acc, "held_out_images": len(xt), "seconds": round(time.time() - t0, 1)}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(out))
    return model.eval(), stats


def load_classifier(path: str | Path) -> DigitsClassifier:
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
