"""Prompt and caption sources of any size, read lazily.

A source is a sequence of strings (``len(source)``, ``source[i]``) indexed once when opened: byte offsets into the
file (8 bytes a row, whatever the text's length), never the text itself, so a million prompts cost a few MB of memory
and a second or two to index. Files are opened again in each process that reads them (DataLoader workers), so an
index is safe to fork.

- ``.txt``: one prompt per non-blank line (stripped).
- ``.jsonl``: one JSON object per line; the prompt is ``column`` (default: the first of prompt / caption / text).
- ``.csv`` / ``.tsv``: a header row, then one record per row (quoted fields may span lines, RFC 4180); ``column`` as
  for JSON lines.
- WebDataset shards (a ``.tar``, a folder of them, or a glob such as ``shards/*.tar``): the caption of each sample,
  from its ``.txt`` member or the ``column`` of its ``.json`` member (`distill_diffusion.data.shards`).
- ``.parquet``, a folder written by ``datasets``' ``save_to_disk`` or ``hf:NAME[:SPLIT]`` (the hub; needs network):
  read through the ``datasets`` library, memory-mapped (`distill_diffusion.data.tables`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError

TEXT_COLUMNS = ("prompt", "caption", "text")
CHUNK = 1 << 20  # 1 MB per read while indexing: temporaries stay small whatever the file size
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


class _File:
    """A binary file opened once per process (a forked DataLoader worker must not share its parent's position)."""

    def __init__(self, path: Path):
        self.path = path
        self._handle, self._pid = None, None

    def read(self, start: int, end: int) -> bytes:
        if self._pid != os.getpid():
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 (kept open for the run)
        self._handle.seek(int(start))
        return self._handle.read(int(end - start))

    def __getstate__(self) -> dict:  # spawned workers reopen the file
        return {"path": self.path, "_handle": None, "_pid": None}


def line_offsets(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the lines of ``path`` holding a non-whitespace byte (ends exclude the newline), read in
    chunks; the whole file is checked to be UTF-8 on the way (one-line error naming the byte)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    starts, ends = [], []
    base, carry = 0, b""  # carry: the unfinished last line of the previous chunk
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (near byte {base + len(carry) + e.start}); "
                                  "save it as UTF-8") from None
            data = carry + chunk
            if not chunk:  # end of file: the last line may lack its newline
                stops = np.array([len(data)]) if data else np.zeros(0, dtype=np.int64)
            else:
                stops = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            if len(stops):
                line_starts = np.concatenate([[0], stops[:-1] + 1])
                nonblank = np.concatenate([[0], np.cumsum(~_WHITESPACE[np.frombuffer(data, dtype=np.uint8)],
                                                           dtype=np.int32)])
                keep = nonblank[stops] - nonblank[line_starts] > 0
                starts.append(base + line_starts[keep])
                ends.append(base + stops[keep])
                consumed = int(stops[-1]) + 1
            else:
                consumed = 0
            if not chunk:
                break
            base, carry = base + consumed, data[consumed:]
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(starts).astype(np.int64) if starts else empty,
            np.concatenate(ends).astype(np.int64) if ends else empty)


class TextLines:
    """One prompt per non-blank line of a UTF-8 text file."""

    def __init__(self, path: Path, what: str = "prompt file"):
        self.file = _File(path)
        self.starts, self.ends = line_offsets(path, what)

    def __len__(self) -> int:
        return len(self.starts)

    def raw(self, i: int) -> str:
        return self.file.read(self.starts[i], self.ends[i]).decode("utf-8")

    def __getitem__(self, i: int) -> str:
        return self.raw(i).strip()


def pick_column(available: list[str], column: str | None, path: Path | str, what: str,
                candidates: tuple[str, ...] = TEXT_COLUMNS, option: str = "data.prompt_column") -> str:
    """``column`` if given (it must exist), else the first of ``candidates`` present; one-line error otherwise."""
    if column is not None:
        if column not in available:
            raise ConfigError(f"{what} {str(path)!r} has no column {column!r}; it has: {', '.join(available)}")
        return column
    for name in candidates:
        if name in available:
            return name
    raise ConfigError(f"{what} {str(path)!r} has none of the columns {', '.join(candidates)} (it has: "
                      f"{', '.join(available) or 'none'}); name one with {option}")


class JsonLines(TextLines):
    """One JSON object per line; the prompt is its ``column`` field."""

    def __init__(self, path: Path, column: str | None, what: str = "prompt file"):
        super().__init__(path, what)
        if not len(self):
            raise ConfigError(f"{what} {str(path)!r} has no non-blank line")
        self.column = pick_column(list(self._row(0)), column, path, what)

    def _row(self, i: int) -> dict:
        try:
            row = json.loads(self.raw(i))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(self.file.path)!r} line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{str(self.file.path)!r} line {i + 1} is not a JSON object")
        return row

    def __getitem__(self, i: int) -> str:
        value = self._row(i).get(self.column)
        return "" if value is None else str(value).strip()


class CsvRows:
    """A CSV / TSV file with a header; a record ends at a newline outside quotes (RFC 4180), so captions holding
    newlines are one record."""

    def __init__(self, path: Path, column: str | None, delimiter: str, what: str = "prompt file"):
        self.file, self.delimiter = _File(path), delimiter
        starts, ends, quotes, start, pos = [], [], 0, None, 0
        with open(path, "rb") as f:
            for line in f:
                if start is None:
                    start = pos
                pos += len(line)
                quotes += line.count(b'"')
                if quotes % 2 == 0:  # the record is complete
                    if line.strip() or pos - start > len(line):
                        starts.append(start)
                        ends.append(pos)
                    start, quotes = None, 0
        if not starts:
            raise ConfigError(f"{what} {str(path)!r} is empty (a header row and one record per row are expected)")
        self.header = self._parse(starts[0], ends[0])
        self.starts, self.ends = np.asarray(starts[1:], dtype=np.int64), np.asarray(ends[1:], dtype=np.int64)
        self.index = self.header.index(pick_column(self.header, column, path, what))

    def _parse(self, start: int, end: int) -> list[str]:
        try:
            text = self.file.read(start, end).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{str(self.file.path)!r} is not UTF-8 text (the record at byte {start}); save it as "
                              "UTF-8") from None
        return next(csv.reader(io.StringIO(text), delimiter=self.delimiter), [])

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> str:
        row = self._parse(self.starts[i], self.ends[i])
        return row[self.index].strip() if self.index < len(row) else ""


class InMemory(list):
    """A list of prompts given in the config (``data.prompts``)."""


def open_text_source(spec: str, column: str | None = None, what: str = "data.prompt_file"):  # noqa: ANN201
    """The source a path or name describes (see the module docstring); refused in one line when it is none."""
    from . import shards, tables  # both import this module for `pick_column`

    path = Path(spec)
    if spec.startswith("hf:"):
        return tables.open_table(spec, column, what)
    if shards.is_shards(spec):
        return shards.TarCaptions(shards.index_shards(spec, what), column)
    if path.is_dir():
        return tables.open_table(spec, column, what)
    if not path.is_file():
        raise ConfigError(f"{what} {spec!r} not found")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".prompts", ""):
        return TextLines(path, what)
    if suffix in (".jsonl", ".ndjson"):
        return JsonLines(path, column, what)
    if suffix in (".csv", ".tsv"):
        return CsvRows(path, column, "\t" if suffix == ".tsv" else ",", what)
    if suffix == ".parquet":
        return tables.open_table(spec, column, what)
    raise ConfigError(f"{what} {spec!r}: unknown kind of file {suffix!r}; allowed: .txt, .jsonl, .csv, .tsv, "
                      ".parquet, WebDataset .tar shards, a `datasets` folder (save_to_disk) or hf:NAME[:SPLIT]")
