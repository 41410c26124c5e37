"""What a run does to fit in less memory, beyond LoRA roles and gradient checkpointing: frozen weights in half
precision, 8-bit optimizer states, the attention kernel.

- ``train.half_frozen`` (under ``train.mixed_precision`` fp16/bf16): every frozen weight (the teacher, the VAE, the
  text encoders, the base that LoRA roles share) is stored in that precision, as diffusers' training scripts store
  their ``weight_dtype`` models; trainable weights stay fp32 (the optimizer's master copy) and the step runs under
  autocast. Halves the teacher's 4 bytes per parameter.
- ``train.optimizer: adamw8bit``: bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
  Quantization"): both Adam moments in 8 bits with a per-block scale, 2 bytes per trainable parameter instead of 8;
  tensors under 4096 elements keep fp32 states. bitsandbytes runs on CPU too.
- ``train.attention: xformers``: diffusers' ``enable_xformers_memory_efficient_attention`` on every UNet; it needs a
  CUDA GPU and the xformers package. The default ``sdpa`` is PyTorch's scaled-dot-product attention (diffusers'
  default processor), which already dispatches to flash / memory-efficient kernels on a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ConfigError
from .roles import Models

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _modules(models: Models) -> list[nn.Module]:
    found = [models.teacher, models.student, models.critic, models.vae]
    if models.text is not None:
        found += list(models.text.encoders)
    return [m for m in found if m is not None]


def cast_frozen(models: Models, dtype: torch.dtype) -> int:
    """Store every frozen floating-point weight of the run's networks in ``dtype``; returns the bytes this saved.

    Frozen means ``requires_grad`` is off as built: the trainer reads each role's own (trainable) weights at the same
    moment, and those stay fp32. A base shared by several roles is cast once."""
    seen: set[int] = set()
    saved = 0
    for module in _modules(models):
        for p in module.parameters():
            if id(p) in seen or p.requires_grad or not p.is_floating_point() or p.dtype == dtype:
                continue
            seen.add(id(p))
            before = p.numel() * p.element_size()
            p.data = p.data.to(dtype)
            saved += before - p.numel() * p.element_size()
    return saved


def check_optimizer(name: str) -> None:
    """Refuse an optimizer that cannot be built before the run directory is written."""
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("train.optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, or the "
                              "package's [bnb] extra); or use train.optimizer adamw") from None


def make_optimizer(name: str, params: Iterable[nn.Parameter], **kwargs) -> torch.optim.Optimizer:  # noqa: ANN003
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, optional dependency)."""
    check_optimizer(name)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def set_attention(models: Models, attention: str, device: torch.device) -> None:
    """Switch every UNet of the run to the chosen attention kernel (``sdpa`` is what diffusers builds)."""
    if attention == "sdpa":
        return
    if importlib.util.find_spec("xformers") is None or device.type != "cuda":
        have = "no xformers package" if importlib.util.find_spec("xformers") is None else f"device {device.type}"
        raise ConfigError(f"train.attention xformers needs the xformers package and a CUDA GPU ({have}); use "
                          "train.attention sdpa, PyTorch's own memory-efficient attention")
    nets = {id(n): n for n in (getattr(getattr(m, "denoiser", m), "net", None) for m in _modules(models))}
    for net in nets.values():
        if hasattr(net, "enable_xformers_memory_efficient_attention"):
            net.enable_xformers_memory_efficient_attention()
