"""Per-sample random draws that do not depend on how the batch is split across processes.

Every data-parallel process holds the same generator (one seed) and makes the same draws in the same order; a
per-sample draw is made for the whole global batch and each process keeps its own rows. So N processes with B samples
each draw exactly what one process with N*B samples draws, and training is the same computation whatever the process
count (up to the order of floating-point sums in the gradient all-reduce). The cost is drawing the global batch's
noise on every process, which is small beside a UNet call. Draws that are not per-sample (a step index for the whole
batch) use the generator directly, identically everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class ShardedGenerator(torch.Generator):
    """A ``torch.Generator`` that knows this process's share (``rank`` of ``world``) of each per-sample draw."""

    def __new__(cls, device: torch.device | str, seed: int, rank: int = 0, world: int = 1):
        return super().__new__(cls, device)

    def __init__(self, device: torch.device | str, seed: int, rank: int = 0, world: int = 1):
        self.manual_seed(seed)
        self.rank, self.world = rank, world


def _share(generator: torch.Generator) -> tuple[int, int]:
    return (generator.rank, generator.world) if isinstance(generator, ShardedGenerator) else (0, 1)


def _rows(draw: Tensor, n: int, generator: torch.Generator) -> Tensor:
    rank, _ = _share(generator)
    return draw[rank * n:(rank + 1) * n]


def randn(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    """Standard normal rows ``shape[0]`` of this process's share, on the generator's device."""
    shape = tuple(shape)
    world = _share(generator)[1]
    draw = torch.randn((shape[0] * world, *shape[1:]), generator=generator, device=generator.device)
    return _rows(draw, shape[0], generator)


def rand(n: int, generator: torch.Generator) -> Tensor:
    """n uniform [0, 1) draws, one per sample."""
    draw = torch.rand(n * _share(generator)[1], generator=generator, device=generator.device)
    return _rows(draw, n, generator)


def randint(low: int, high: int, n: int, generator: torch.Generator) -> Tensor:
    """n integers in [low, high), one per sample."""
    draw = torch.randint(low, high, (n * _share(generator)[1],), generator=generator, device=generator.device)
    return _rows(draw, n, generator)
