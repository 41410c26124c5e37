"""Streaming data: a seeded, resumable epoch order over a source of any size, read by a ``torch.utils.data``
DataLoader (workers, prefetch), each data-parallel process reading its own rows.

The order is a stream of epochs; epoch e is a permutation of the source's rows drawn from a generator seeded by
(seed, stream, e), so it is the same on every process and after any resume. Global batch k covers positions
[kG, (k + 1)G) of that stream (G = per-process batch x processes) and process r reads [kG + rB, kG + (r + 1)B), so the
processes' rows are disjoint and together cover each epoch once. The position (rows consumed by all processes) is the
feed's whole state: it goes into every checkpoint, and a resumed run continues the same order from there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError


class EpochOrder:
    """Rows of an endless stream of seeded permutations of range(n)."""

    def __init__(self, n: int, seed: int, stream: str):
        if n < 1:
            raise ValueError("an epoch order needs at least one row")
        self.n, self.seed, self.stream = n, seed, stream
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            key = hashlib.sha256(f"{self.seed}:{self.stream}:{epoch}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).numpy()
        return self._perm

    def rows(self, start: int, count: int) -> np.ndarray:
        """The rows at stream positions [start, start + count)."""
        out, pos = [], start
        while pos < start + count:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + count - pos)
            out.append(self.permutation(epoch)[offset:offset + take])
            pos += take
        return np.concatenate(out)


class _Batches:
    """The batch sampler: this process's rows of each global batch, from ``start`` on (endless)."""

    def __init__(self, order: EpochOrder, start: int, batch: int, rank: int, world: int):
        self.order, self.start, self.batch, self.rank, self.world = order, start, batch, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        while True:
            yield self.order.rows(pos + self.rank * self.batch, self.batch).tolist()
            pos += self.batch * self.world


def _item(source: Any, i: int) -> Any:
    return source[i]


class _Items(Dataset):
    """``source[i]`` as a DataLoader item; a `ConfigError` travels back as a value, so the main process can raise
    it as the one line it is (a worker's exception would arrive wrapped in its traceback)."""

    def __init__(self, source: Any, read: Callable[[Any, int], Any]):
        self.source, self.read = source, read

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.read(self.source, i)
        except ConfigError as e:
            return ConfigError(str(e))


def _collate(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, ConfigError):
            return item
    first = items[0]
    if isinstance(first, tuple):
        return tuple(_collate(list(col)) for col in zip(*items))
    if isinstance(first, dict):
        return {k: torch.stack([it[k] for it in items]) for k in first}
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    return list(items)


class Feed:
    """Batches of ``read(source, i)`` in the epoch order, through a DataLoader started at the current position on
    first use (and restarted by `load_state`)."""

    def __init__(self, source: Any, read: Callable[[Any, int], Any], seed: int, stream: str, workers: int,
                 prefetch: int):
        self.source, self.read = source, read
        self.order = EpochOrder(len(source), seed, stream)
        self.workers, self.prefetch = workers, prefetch
        self.position = 0  # rows consumed by all processes together
        self._it: Iterator | None = None
        self._shape: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    def next(self, n: int, rank: int, world: int) -> Any:
        if self._it is None or self._shape != (n, rank, world):
            sampler = _Batches(self.order, self.position, n, rank, world)
            kwargs = {"prefetch_factor": self.prefetch, "persistent_workers": False} if self.workers else {}
            loader = DataLoader(_Items(self.source, self.read), batch_sampler=sampler, num_workers=self.workers,
                                collate_fn=_collate, **kwargs)
            self._it, self._shape = iter(loader), (n, rank, world)
        batch = next(self._it)
        self.position += n * world
        if isinstance(batch, ConfigError):
            self.close()
            raise batch
        return batch

    def load_state(self, position: int) -> None:
        self.close()
        self.position = int(position)

    def close(self) -> None:
        self._it = None  # the DataLoader's workers stop when its iterator is collected
