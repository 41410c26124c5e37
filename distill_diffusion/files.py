"""Writing that a kill cannot half-do: every file and directory the toolkit publishes is built under a temporary
name beside its destination and then renamed (a rename within one filesystem is atomic on POSIX), so a reader finds
either the previous complete version or the new complete one, never a mixture."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import ConfigError


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp_{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the complete directory ``tmp`` as ``final``. An existing ``final`` is first renamed aside, so a kill
    between the two renames leaves ``tmp`` whole (and the older copies elsewhere) rather than a half-deleted
    ``final``; the old copy is deleted last."""
    old = final.with_name(f".old_{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a published directory: renamed away first, so no reader sees it half-deleted."""
    gone = path.with_name(f".old_{path.name}")
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor in ``state`` holding a NaN or an infinity, else None."""
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """An output directory a command will create or fill: refused in one line when it names an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a file, not a directory; choose a directory (it is created)")
    return out
