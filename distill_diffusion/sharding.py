"""Sharded data parallelism for full-weight roles (FSDP2), asked for through an accelerate FSDP config.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (ZeRO-3: weights, gradients and Adam states sharded)
or ``configs/accelerate/fsdp_zero2.yaml`` (``reshard_after_forward: false``, ZeRO-2: weights stay gathered from
forward to backward) launches the processes and says how to shard; accelerate parses the config
(``FullyShardedDataParallelPlugin``) and the trainer shards. Why the trainer and not ``accelerator.prepare``: a method
calls its roles through `Models` (a student, a critic, a frozen teacher, maybe one UNet shared by LoRA adapters), and
wraps nothing; PyTorch's FSDP2 (``fully_shard``) shards a module in place, so `Models` keeps working unchanged.

What is sharded: each role whose network is entirely its own trainable weights (a full student, a full critic), one
FSDP unit per UNet down / mid / up block plus the rest of the network. What is not: the frozen teacher, VAE and text
encoders (frozen, in half precision with ``train.half_frozen``), a LoRA role's shared base, a critic that is the
teacher's frozen network with trainable heads (ADD/LADD), and small trainable parts outside the network (a GAN head):
their gradients are averaged by the trainer as in plain data parallelism.

Checkpoints, ``final/`` and the EMA hold full tensors (gathered on every process, written by process 0) in the same
files a one-process run writes, so a sharded run resumes in one process and back. Checked against PyTorch's
``torch/distributed/fsdp/_fully_shard`` (per-parameter DTensor sharding on dim 0, in-place module conversion) and
accelerate's ``utils/fsdp_utils.py`` (``fsdp2_prepare_model``: block-level units, then the root).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .lora import own_parameters


@dataclass(frozen=True)
class Sharding:
    reshard_after_forward: bool  # True: FULL_SHARD / ZeRO-3; False: SHARD_GRAD_OP / ZeRO-2


def requested() -> Sharding | None:
    """The sharding the launch asked for (None: plain data parallelism), taken out of the environment so that
    accelerate itself stays a plain multi-process launch (its FSDP path would wrap modules the methods call)."""
    environ = os.environ
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy

    try:
        plugin = FullyShardedDataParallelPlugin()  # accelerate reads its own FSDP_* variables
    except ValueError as e:
        raise ConfigError(f"accelerate FSDP config: {e}") from None
    if plugin.fsdp_version == 2:
        reshard = plugin.reshard_after_forward
        offload = type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    else:
        strategy = plugin.sharding_strategy or plugin.reshard_after_forward
        if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise ConfigError(f"FSDP sharding strategy {getattr(strategy, 'name', strategy)} is not supported; use "
                              "FULL_SHARD or SHARD_GRAD_OP (or fsdp_version 2 with fsdp_reshard_after_forward)")
        reshard = strategy == ShardingStrategy.FULL_SHARD
        offload = bool(plugin.cpu_offload.offload_params)
    if offload:
        raise ConfigError("fsdp_offload_params is not supported; shard over more processes, or use "
                          "configs/accelerate/ddp.yaml with train.optimizer: adamw8bit (docs/distributed.md)")
    for key in [k for k in environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
        del environ[key]
    return Sharding(reshard_after_forward=bool(reshard))


def network(role: nn.Module) -> nn.Module:
    """The network inside a role (`Student` -> `Denoiser` -> net)."""
    return getattr(role, "denoiser", role).net


def shardable(role: nn.Module, own: Mapping[str, nn.Parameter]) -> bool:
    """Whether every weight of the role's network is the role's own trainable weight (not a shared or frozen base)."""
    mine = {id(p) for p in own.values()}
    return all(id(p) in mine for p in network(role).parameters())


def roles_to_shard(roles: Mapping[str, nn.Module], optimizer: str, copies_student: bool, method: str) -> list[str]:
    """The roles an FSDP launch shards: each full-weight role (a LoRA role's network is a shared frozen base), or a
    refusal in one line when the optimizer or the method cannot work on sharded weights."""
    if optimizer != "adamw":
        raise ConfigError(f"train.optimizer {optimizer} cannot step sharded weights; use adamw under FSDP (it shards "
                          "the Adam states already) or configs/accelerate/ddp.yaml")
    sharded = [r for r, m in roles.items() if shardable(m, own_parameters(m))]
    if "student" in sharded and copies_student:
        raise ConfigError(f"{method} keeps a copy of the student, which a sharded student cannot give; use "
                          "configs/accelerate/ddp.yaml (or a LoRA student, model.student_lora_rank)")
    return sharded


def shard_network(net: nn.Module, sharding: Sharding, device: torch.device) -> None:
    """FSDP2 units: each block of every ModuleList child (UNet down / up blocks), the mid block, then the network."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    units = [m for child in net.children() if isinstance(child, nn.ModuleList) for m in child]
    if isinstance(getattr(net, "mid_block", None), nn.Module):
        units.append(net.mid_block)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)
    fully_shard(net, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)


def reshard(net: nn.Module) -> None:
    """Free every gathered weight of a sharded network. A forward without backward (no_grad sampling) leaves them
    gathered, with the ``requires_grad`` they were gathered with; the next forward then gathers afresh."""
    from torch.distributed.fsdp import FSDPModule

    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it, in the same order)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: Tensor, target: Tensor) -> Tensor:
    """``value`` (a full tensor) laid out as ``target``: this process's shard when ``target`` is sharded."""
    if is_sharded(value):
        return value
    if not is_sharded(target):
        return value.to(target.device, target.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None)  # every process holds the same full tensor: no communication


def load_full(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load full tensors into a module whose parameters may be sharded (each process keeps its shard)."""
    current = module.state_dict()
    module.load_state_dict({k: like(v, current[k]) if k in current else v for k, v in state.items()}, strict=False)


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm over sharded and replicated parameters; returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), device=grads[0].device if grads else "cpu")
    shards = sum((g.to_local().float().pow(2).sum() for g in grads if is_sharded(g)), zero)
    torch.distributed.all_reduce(shards)  # the shards' squares add up to the whole's
    replicated = sum((g.float().pow(2).sum() for g in grads if not is_sharded(g)), zero)  # alike on every process
    norm = float((shards + replicated).sqrt())
    if math.isfinite(norm) and norm > max_norm:
        with torch.no_grad():
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))
    return norm


def hook_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Keep the optimizer's state dict in the one-process format: full tensors out, this process's shards in."""

    def gather(_opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        # new inner dicts: the returned ones are the optimizer's live state
        state_dict["state"] = {i: {k: full(v) for k, v in s.items()} for i, s in state_dict["state"].items()}
        return state_dict

    def scatter(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        params = [p for group in opt.param_groups for p in group["params"]]
        state_dict["state"] = {i: {k: like(v, params[int(i)]) if torch.is_tensor(v) and v.ndim else v
                                   for k, v in s.items()} for i, s in state_dict["state"].items()}
        return state_dict

    optimizer.register_state_dict_post_hook(gather)
    optimizer.register_load_state_dict_pre_hook(scatter)
