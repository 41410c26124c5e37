"""Further feature spaces for Frechet distance on image teachers: DINOv2 and CLIP image features.

Inception features reward ImageNet-class cues and under-rate diffusion models' images; recent evaluation work
measures in a self-supervised or language-supervised space as well:

- ``dinov2``: FD_DINOv2 (Stein et al., "Exposing flaws of generative model evaluation metrics and their unfair
  treatment of diffusion models", NeurIPS 2023; the EDM2 paper reports it beside FID): the DINOv2 ViT-L/14 CLS token
  (after the final layer norm) of the image resized to 224 x 224 (bicubic), ImageNet normalisation.
- ``clip``: FD in CLIP image-embedding space (Kynkaanniemi et al., "The Role of ImageNet Classes in Frechet Inception
  Distance", ICLR 2023): the projected image embedding of CLIP ViT-L/14 at 224 x 224, CLIP's normalisation.

A spec is ``dinov2`` / ``clip`` (the default weights above, from the Hugging Face hub where it is reachable) or
``dinov2:NAME_OR_DIR`` / ``clip:NAME_OR_DIR`` (another checkpoint of the same family, or a local copy: what an
offline machine passes). The weights are loaded once; the reference statistics are cached under a key that includes
them (`eval.fid.cache_key`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill_diffusion.errors import ConfigError, first_line

DEFAULTS = {"dinov2": "facebook/dinov2-large", "clip": "openai/clip-vit-large-patch14"}
_MEAN_STD = {"dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
             "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))}
SIZE = 224


def parse_spec(spec: str) -> tuple[str, str]:
    """``kind[:name]`` -> (kind, name)."""
    kind, _, name = spec.partition(":")
    if kind not in DEFAULTS:
        raise ConfigError(f"unknown feature backbone {spec!r}; choose dinov2[:NAME_OR_DIR] or clip[:NAME_OR_DIR]")
    return kind, name or DEFAULTS[kind]


class Backbone(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> features (B, D) of a DINOv2 or CLIP vision model."""

    def __init__(self, spec: str):
        super().__init__()
        self.kind, self.name = parse_spec(spec)
        try:
            if self.kind == "dinov2":
                from transformers import Dinov2Model

                self.net = Dinov2Model.from_pretrained(self.name)
            else:
                from transformers import CLIPVisionModelWithProjection

                self.net = CLIPVisionModelWithProjection.from_pretrained(self.name)
        except Exception as e:  # noqa: BLE001 (offline: hub errors of several kinds; a wrong directory: OSError)
            raise ConfigError(f"the {self.kind} backbone {self.name!r} could not be loaded ({type(e).__name__}: "
                              f"{first_line(e)[:150]}); pass a local copy ({self.kind}:DIR) or run where the hub is "
                              "reachable") from None
        self.net.requires_grad_(False).eval()
        mean, std = _MEAN_STD[self.kind]
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.mean.device, torch.float32).clamp(0, 1)
        if x.shape[-2:] != (SIZE, SIZE):
            x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False,
                                          antialias=x.shape[-1] > SIZE).clamp(0, 1)
        out = self.net(pixel_values=(x - self.mean) / self.std)
        return out.pooler_output if self.kind == "dinov2" else out.image_embeds
