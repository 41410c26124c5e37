"""CLIP score with open_clip: 100 * max(cos(image embedding, text embedding), 0), averaged over images.

Defaults follow what the anchors report: ViT-g-14 on laion2b (SiD-LSG, DMD2's option); ViT-B-32 is DMD2's default.
The two are not comparable with each other. Offline (tests, this CPU machine) a randomly initialised model is built
with ``pretrained=None``: the number is then only a plumbing check, not a quality measure.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .fid import as_float_images

DEFAULT_MODEL = ("ViT-g-14", "laion2b_s34b_b88k")
SMALL_MODEL = ("ViT-B-32", "laion2b_s34b_b79k")


class ClipScorer:
    def __init__(self, model_name: str = DEFAULT_MODEL[0], pretrained: str | None = DEFAULT_MODEL[1],
                 device: torch.device | str = "cpu"):
        import open_clip

        self.model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = device
        cfg = self.model.visual.preprocess_cfg
        self.size = self.model.visual.image_size
        self.mean = torch.tensor(cfg["mean"], device=device).reshape(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).reshape(1, 3, 1, 1)

    @torch.no_grad()
    def per_image(self, images: np.ndarray | torch.Tensor, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        x = as_float_images(images)
        if len(x) != len(prompts):
            raise ValueError(f"{len(x)} images but {len(prompts)} prompts")
        size = self.size if isinstance(self.size, (tuple, list)) else (self.size, self.size)
        scores = []
        for i in range(0, len(x), batch_size):
            xb = F.interpolate(x[i : i + batch_size].to(self.device), size=tuple(size), mode="bicubic",
                               align_corners=False).clamp(0, 1)
            img = F.normalize(self.model.encode_image((xb - self.mean) / self.std).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(self.tokenizer(prompts[i : i + batch_size]).to(self.device))
                              .float(), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp_min(0).cpu())
        return torch.cat(scores).numpy()

    def __call__(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> float:
        return float(self.per_image(images, prompts).mean())
