"""Per-sample random draws that do not depend on how the batch is split across processes.

Every data-parallel process holds the same generator (one seed) and makes the same draws in the same order; a
per-sample draw is made for the whole global batch and each process keeps its own rows. So N processes with B samples
each draw exactly what one process with N*B samples draws, and training is the same computation whatever the process
count (up to the order of floating-point sums in the gradient all-reduce). The cost is drawing the global batch's
noise on every process, which is small beside a UNet call. Draws that are not per-sample (a step index for the whole
batch) use the generator directly, identically everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class ShardedGenerator(torch.Generator):
    """A ``torch.Generator`` that knows this process's share (``rank`` of ``world``) of each per-sample draw."""

    def __new__(cls, device: torch.device | str, seed: int, rank: int = 0, world: int = 1):
        return super().__new__(cls, device)

    def __init__(self, device: torch.device | str, seed: int, rank: int = 0, world: int = 1):
        self.manual_seed(seed)
        self.rank, self.world = rank, world


def _mine(draw: Callable[[int], Tensor], n: int, generator: torch.Generator) -> Tensor:
    """``draw(rows)`` for the global batch of n rows per process; this process's n rows of it."""
    rank, world = (generator.rank, generator.world) if isinstance(generator, ShardedGenerator) else (0, 1)
    return draw(n * world)[rank * n:(rank + 1) * n]


def randn(shape: Sequence[int], generator: torch.Generator | list[torch.Generator], like: Tensor | None = None
          ) -> Tensor:
    """Standard normal rows ``shape[0]`` of this process's share, on the generator's device (or ``like``'s device
    and dtype). With a list of generators row i is drawn from generator i, as diffusers does, so a sample does not
    depend on which batch it was drawn in."""
    shape = tuple(shape)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator])
    else:
        noise = _mine(lambda m: torch.randn((m, *shape[1:]), generator=generator, device=generator.device),
                      shape[0], generator)
    return noise if like is None else noise.to(like.device, like.dtype)


def rand(n: int, generator: torch.Generator) -> Tensor:
    """n uniform [0, 1) draws, one per sample."""
    return _mine(lambda m: torch.rand(m, generator=generator, device=generator.device), n, generator)


def randint(low: int, high: int, n: int, generator: torch.Generator) -> Tensor:
    """n integers in [low, high), one per sample."""
    return _mine(lambda m: torch.randint(low, high, (m,), generator=generator, device=generator.device), n, generator)
