"""Tabular sources through the ``datasets`` library (``pip install 'distill-diffusion[data]'``): a ``.parquet``
file, a folder written by ``Dataset.save_to_disk`` or ``hf:NAME[:SPLIT]`` on the hub (needs network). ``datasets``
keeps the table in memory-mapped Arrow files, so rows are read on demand and memory does not grow with the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sources import pick_column

IMAGE_COLUMNS = ("image", "jpg", "png", "img")


def load_table(spec: str, what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{what} {spec!r} is read with the `datasets` library, which is not installed; "
                          "pip install 'distill-diffusion[data]' (or use .txt / .jsonl / .csv / .tar)") from None
    try:
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            table = datasets.load_dataset(name, split=split or "train")
        elif Path(spec).is_dir():
            table = datasets.load_from_disk(spec)
        else:
            table = datasets.load_dataset("parquet", data_files=spec, split="train")
    except (OSError, ValueError, FileNotFoundError, ConnectionError) as e:
        raise ConfigError(f"{what} {spec!r} cannot be opened as a dataset ({str(e).splitlines()[0][:200]})") from None
    if isinstance(table, datasets.DatasetDict):
        if "train" not in table:
            raise ConfigError(f"{what} {spec!r} has splits {', '.join(table)} and no `train`; pick one: hf:NAME:SPLIT")
        table = table["train"]
    return table


class TableColumn:
    """One text column of a `datasets` table."""

    def __init__(self, table: Any, column: str):
        self.table = table.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> str:
        value = self.table[int(i)][self.column]
        return "" if value is None else str(value).strip()


def open_table(spec: str, column: str | None, what: str) -> TableColumn:
    table = load_table(spec, what)
    return TableColumn(table, pick_column(list(table.column_names), column, Path(spec), what))


def image_column(table: Any, column: str | None, spec: str, what: str) -> str:
    return pick_column(list(table.column_names), column, spec, what, IMAGE_COLUMNS, "data.image_column")
