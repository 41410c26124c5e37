"""What the processes of a data-parallel run do together: agree on a flag, average gradients, start from one set of
weights. Each function is a collective (every process calls it, in the same order) and a no-op for one process.

The trainer averages each updating role's gradients itself (`sync_gradients`) instead of wrapping roles in DDP:
roles may share one UNet (LoRA adapters) and methods call them through `Models`.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import ConfigError


def check_parallel(accelerator: Accelerator, batch_size: int) -> None:
    """Data parallelism as this trainer does it: plain processes (CPU gloo or multi-GPU), global batch split evenly."""
    kind = accelerator.distributed_type
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(f"accelerate distributed type {kind.value} is not supported; use configs/accelerate/"
                          "ddp.yaml, fsdp.yaml, fsdp_zero2.yaml or deepspeed_zero2.yaml (docs/distributed.md)")
    if batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch and must divide evenly over the "
                          f"{accelerator.num_processes} processes; choose a multiple of {accelerator.num_processes}")


def agree(ok: bool, world: int) -> bool:
    """Whether ``ok`` holds on every process (a collective: every process must call it)."""
    if world == 1:
        return ok
    flag = torch.tensor([float(ok)])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (so all processes skip, or none does)."""
    return agree(bool(torch.isfinite(loss.detach()).all()), world)


def sync_gradients(params: list[torch.nn.Parameter], world: int, bucket: int = 2**24) -> None:
    """Average gradients over processes (what DDP's reducer does), in flat buckets of ``bucket`` elements."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    while grads:
        size, n = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket):
            size, n = size + grads[n].numel(), n + 1
        flat = _flatten_dense_tensors(grads[:n])
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, r in zip(grads[:n], _unflatten_dense_tensors(flat, grads[:n])):
            g.copy_(r)
        grads = grads[n:]


def broadcast_parameters(params: list[torch.nn.Parameter], world: int) -> None:
    """Every process starts from process 0's weights (seeded builds agree already; this makes it certain)."""
    if world > 1:
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
