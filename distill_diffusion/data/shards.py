"""WebDataset shards: plain tar files in which the members of one sample share a key (the member's path up to the
first dot of its file name: ``000123.jpg``, ``000123.txt``, ``000123.json``).

`index_shards` reads each shard's member headers once (no member data) and keeps, for every sample, the byte range of
its image and of its caption; a sample is then read with one seek, so training can visit samples in any order.
Memory: five integers a sample.
"""

from __future__ import annotations

import glob
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .sources import TEXT_COLUMNS, _File

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_shards(spec: str) -> bool:
    path = Path(spec)
    if path.suffix == ".tar" or any(c in spec for c in "*?["):
        return True
    return path.is_dir() and any(path.glob("*.tar"))


def shard_files(spec: str, what: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
    elif any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise ConfigError(f"{what} {spec!r}: no .tar shard found")
    return files


@dataclass
class ShardIndex:
    files: list[Path]
    shard: np.ndarray  # (N,) which file
    image: np.ndarray  # (N, 2) byte start / end of the image member; -1 when the sample has none
    caption: np.ndarray  # (N, 2) of the .txt member, else of the .json member; -1 when none
    caption_is_json: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.shard)


def index_shards(spec: str, what: str) -> ShardIndex:
    files = shard_files(spec, what)
    shard, image, caption, is_json = [], [], [], []
    for k, f in enumerate(files):
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(f, mode="r:") as tar:  # uncompressed: byte offsets stay valid for direct reads
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, name = m.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.offset_data + m.size)
        except (tarfile.TarError, OSError) as e:
            raise ConfigError(f"{what} shard {str(f)!r} cannot be read as an uncompressed tar ({e}); WebDataset "
                              "shards are plain .tar files") from None
        for members in samples.values():  # insertion order: the shard's own order
            img = next((members[e] for e in IMAGE_EXTS if e in members), (-1, -1))
            cap = members.get("txt") or members.get("json") or (-1, -1)
            shard.append(k)
            image.append(img)
            caption.append(cap)
            is_json.append("txt" not in members and "json" in members)
    if not shard:
        raise ConfigError(f"{what} {spec!r}: the shards hold no sample")
    return ShardIndex(files, np.asarray(shard, dtype=np.int32), np.asarray(image, dtype=np.int64),
                      np.asarray(caption, dtype=np.int64), np.asarray(is_json, dtype=bool))


class TarCaptions:
    """The captions of WebDataset samples: the ``.txt`` member, else the ``column`` field of the ``.json`` member
    (default: the first of prompt / caption / text); a sample with neither has the empty caption."""

    def __init__(self, index: ShardIndex, column: str | None = None):
        self.index, self.column = index, column
        self.files = [_File(f) for f in index.files]

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int, span: np.ndarray) -> bytes:
        return self.files[self.index.shard[i]].read(span[0], span[1])

    def __getitem__(self, i: int) -> str:
        start, _ = self.index.caption[i]
        if start < 0:
            return ""
        text = self.read(i, self.index.caption[i]).decode("utf-8", errors="replace")
        if not self.index.caption_is_json[i]:
            return text.strip()
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"shard {str(self.index.files[self.index.shard[i]])!r}: sample {i} has a .json member "
                              "that is not JSON") from None
        names = [self.column] if self.column else list(TEXT_COLUMNS)
        value = next((row[n] for n in names if isinstance(row, dict) and n in row), "")
        return str(value).strip()
