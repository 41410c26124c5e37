"""LoRA adapters (peft) for students and critics, and roles that share one frozen base network.

A LoRA critic sits on the teacher's own UNet as the adapter ``"critic"``: the teacher is that UNet with every adapter
off, the critic is the same UNet with its adapter on (SwiftBrush, Nguyen & Tran 2024, arXiv:2312.05239, Sec. 4;
``train_swiftbrush.py`` in VinAIResearch/SwiftBrush switches peft adapters the same way). Teacher and critic then cost
one set of base weights plus the adapter, instead of two full UNets. A LoRA student is the adapter ``"student"`` on
the same UNet, so with both the three roles cost one UNet plus two adapters.

`adapter_scope` selects what a shared network computes for one call. It sets peft's per-layer switches directly
(``_disable_adapters``, ``_active_adapter``) instead of calling ``enable_adapters`` / ``set_adapter``, because those
public calls also rewrite ``requires_grad`` on the adapter weights, and the trainer owns that flag (only the role
being updated takes gradients).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .denoiser import Cond, Denoiser
from .errors import ConfigError
from .process import NoiseProcess


def add_lora(unet: Any, rank: int, alpha: float | None, targets: list[str], seed: int, name: str) -> Any:
    """Add a trainable LoRA adapter ``name`` on ``targets`` of ``unet`` (base weights frozen; adapters already there
    stay trainable).

    B = 0 at init (peft's "gaussian" init), so the adapted network starts equal to the base, as diffusers' LCM-LoRA
    script and SwiftBrush initialise theirs; the random A matrices are seeded by ``seed``.
    """
    from peft import LoraConfig

    if not getattr(unet, "_hf_peft_config_loaded", False):
        unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights="gaussian")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            unet.add_adapter(config, adapter_name=name)
    except ValueError as e:
        raise ConfigError(f"model.lora_targets {list(targets)}: {e}".splitlines()[0]) from None
    adapters = list(unet.peft_config)
    for pname, p in unet.named_parameters():  # peft leaves only the newest adapter trainable; re-mark them all
        if any(f".{a}." in pname for a in adapters):
            p.requires_grad_(True)
            if f".{name}." in pname and p.is_floating_point():
                p.data = p.data.float()  # peft makes adapters in a bf16 base's dtype; trainable weights stay fp32
    return unet


def other_adapters(module: nn.Module) -> set[str]:
    """The adapters on a role's network that belong to other roles (empty unless the network is shared)."""
    inner = getattr(module, "denoiser", module)
    if not isinstance(inner, SharedDenoiser):
        return set()
    return set(getattr(inner.net, "peft_config", {})) - {inner.adapter}


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weights a role trains, by name: its trainable parameters, less other roles' adapters on a shared network.

    A `SharedDenoiser` (or a `Student` around one) sees the whole shared UNet; its own weights are its adapter's and
    anything trainable it adds (e.g. a GAN head), never the frozen base or another role's adapter. Read it while
    ``requires_grad`` is as built (the trainer switches it per phase and restores it when training ends).
    """
    others = other_adapters(module)
    return {k: p for k, p in module.named_parameters()
            if p.requires_grad and not any(f".{a}." in k for a in others)}


def tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapter_scope(layers: list[nn.Module], adapter: str | None) -> Iterator[None]:
    """Within the block, ``layers`` compute with only ``adapter`` active (``None``: the bare base network)."""
    saved = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        yield
    finally:
        for layer, (disabled, active) in zip(layers, saved):
            layer._disable_adapters, layer._active_adapter = disabled, active


class SharedDenoiser(Denoiser):
    """A `Denoiser` on a network shared with other roles, computing with one adapter (or none, for the teacher)."""

    def __init__(self, net: nn.Module, process: NoiseProcess, adapter: str | None):
        super().__init__(net, process)
        self.adapter = adapter
        self._layers: list[nn.Module] | None = None

    def raw(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if self._layers is None:
            self._layers = tuner_layers(self.net)
        with adapter_scope(self._layers, self.adapter):
            return super().raw(x_t, t, cond)

