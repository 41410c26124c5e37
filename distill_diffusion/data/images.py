"""Real images of any size and aspect ratio, with their captions, read lazily.

Each image is resized so its shorter side is the teacher's resolution, then center-cropped to a square, as diffusers'
training scripts do (``Resize(resolution)`` then ``CenterCrop(resolution)``; bicubic here, as the toolkit has always
resized), and scaled to [-1, 1]. SDXL's aspect-ratio buckets are not implemented: every image is one square crop.

Sources (``data.real``): a folder, searched recursively (captions from a same-named ``.txt`` or ``.json`` beside each
image, or from a ``metadata.jsonl`` / ``metadata.csv`` at its top with a ``file_name`` column, as ``datasets``'
imagefolder reads them); WebDataset shards; a ``datasets`` table with an image column (``.parquet``, a
``save_to_disk`` folder, ``hf:NAME[:SPLIT]``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import ConfigError
from . import shards, tables
from .sources import TEXT_COLUMNS, CsvRows, JsonLines

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MIN_SIDE = 8


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The images of a folder (.png/.jpg/.jpeg/.webp, any case), sorted by path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def square_crop(img: Image.Image, size: int, name: str) -> Tensor:
    """(3, size, size) in [-1, 1]: the shorter side resized to ``size``, then the center square."""
    if min(img.size) < MIN_SIDE:
        raise ConfigError(f"data.real image {name!r} is {img.width}x{img.height}; images must be at least "
                          f"{MIN_SIDE}x{MIN_SIDE} (each is resized and center-cropped to {size}x{size})")
    img = img.convert("RGB")
    w, h = img.size  # the shorter side becomes size, the longer int(size * long / short), as torchvision computes
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def decode(data: bytes | Path, size: int, name: str) -> Tensor:
    try:
        img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image I can decode"
        raise ConfigError(f"data.real image {name!r} cannot be read ({type(e).__name__}); remove or replace it "
                          "(allowed: readable .png/.jpg/.jpeg/.webp files)") from None
    return square_crop(img, size, name)


def _caption_of(image: Path, metadata: dict[str, str]) -> str:
    for sidecar in (image.with_suffix(".txt"), image.with_suffix(".json")):
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"caption file {str(sidecar)!r} is not UTF-8 text; save it as UTF-8") from None
            if sidecar.suffix == ".txt":
                return text.strip()
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"caption file {str(sidecar)!r} is not JSON") from None
            return str(next((row[k] for k in TEXT_COLUMNS if isinstance(row, dict) and k in row), "")).strip()
    return metadata.get(image.name, "")


def _metadata(folder: Path, column: str | None) -> dict[str, str]:
    """file name -> caption from ``metadata.jsonl`` / ``metadata.csv`` at the folder's top (``file_name`` column)."""
    for name, opener in (("metadata.jsonl", lambda p, c: JsonLines(p, c, "metadata file")),
                         ("metadata.csv", lambda p, c: CsvRows(p, c, ",", "metadata file"))):
        path = folder / name
        if path.is_file():
            captions, files = opener(path, column), opener(path, "file_name")
            return {Path(files[i]).name: captions[i] for i in range(len(files))}
    return {}


class ImageFolder:
    """Every image under ``folder`` (recursive, sorted by path), with its caption."""

    def __init__(self, folder: Path, size: int, column: str | None = None, check: bool = True):
        self.size = size
        self.files = image_files(folder, recursive=True)
        if not self.files:
            raise ConfigError(f"data.real {str(folder)!r} holds no .png/.jpg/.jpeg/.webp image")
        metadata = _metadata(folder, column)
        self.captions = [_caption_of(f, metadata) for f in self.files]
        if check:  # headers only (fast): an unreadable or tiny file is named before training starts
            for f in self.files:
                try:
                    with Image.open(f) as img:
                        small = min(img.size) < MIN_SIDE
                        dims = img.size
                except (OSError, SyntaxError, ValueError) as e:
                    raise ConfigError(f"data.real image {str(f)!r} cannot be read ({type(e).__name__}); remove or "
                                      "replace it (allowed: readable .png/.jpg/.jpeg/.webp files)") from None
                if small:
                    raise ConfigError(f"data.real image {str(f)!r} is {dims[0]}x{dims[1]}; images must be at least "
                                      f"{MIN_SIDE}x{MIN_SIDE} (each is resized and center-cropped to {size}x{size})")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        return decode(self.files[i], self.size, str(self.files[i])), self.captions[i]


class ShardImages:
    """The images of WebDataset samples (samples without an image member are skipped), with their captions."""

    def __init__(self, spec: str, size: int, column: str | None = None):
        index = shards.index_shards(spec, "data.real")
        self.captions = shards.TarCaptions(index, column)
        self.rows = np.flatnonzero(index.image[:, 0] >= 0)
        if not len(self.rows):
            raise ConfigError(f"data.real {spec!r}: no sample holds a .jpg/.jpeg/.png/.webp member")
        self.size = size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        row = self.rows[i]
        index = self.captions.index
        name = f"{index.files[index.shard[row]]}#{row}"
        return decode(self.captions.read(row, index.image[row]), self.size, name), self.captions[row]


class TableImages:
    """An image column (and a caption column, if any) of a `datasets` table."""

    def __init__(self, spec: str, size: int, image_column: str | None = None, caption_column: str | None = None):
        table = tables.load_table(spec, "data.real")
        self.image = tables.image_column(table, image_column, spec, "data.real")
        names = list(table.column_names)
        self.caption = caption_column or next((c for c in TEXT_COLUMNS if c in names), None)
        self.table = table.select_columns([self.image] + ([self.caption] if self.caption else []))
        self.size, self.spec = size, spec

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        row = self.table[int(i)]
        img = row[self.image]
        name = f"{self.spec}[{i}]"
        if isinstance(img, dict):  # an undecoded Image feature: {"bytes": ..., "path": ...}
            img = img.get("bytes") or Path(img["path"])
        tensor = square_crop(img, self.size, name) if isinstance(img, Image.Image) else decode(img, self.size, name)
        caption = row.get(self.caption) if self.caption else ""
        return tensor, "" if caption is None else str(caption).strip()


def open_image_source(spec: str, size: int, image_column: str | None = None, caption_column: str | None = None,
                      check: bool = True):  # noqa: ANN201
    path = Path(spec)
    if spec.startswith("hf:") or path.suffix.lower() == ".parquet":
        return TableImages(spec, size, image_column, caption_column)
    if shards.is_shards(spec):
        return ShardImages(spec, size, caption_column)
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return TableImages(spec, size, image_column, caption_column)
        return ImageFolder(path, size, caption_column, check)
    raise ConfigError(f"data.real {spec!r} is neither `digits`, an image folder, WebDataset .tar shards, a .parquet "
                      "file, a `datasets` folder, nor hf:NAME[:SPLIT]")
