"""The student's exponential moving average: what previews, `sample` and exports use when ``train.ema_decay`` > 0."""

from __future__ import annotations

import torch

from .lora import own_parameters


class EMA:
    """Exponential moving average of the student's trainable weights (kept in fp32)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in own_parameters(module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for k, v in self.shadow.items():
                params[k].copy_(v.to(params[k].dtype))
