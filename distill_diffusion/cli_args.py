"""The command line's argument types: one-line parse errors and the number / list values its options take."""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other error of the tool (argparse prints the usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"distill-diffusion: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _number(kind: type, low: float, text: str, strict: bool = False) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
    return value


def count(text: str) -> int:
    """An option that counts something: an integer >= 1."""
    return _number(int, 1, text)


def non_negative(text: str) -> int:
    """A seed or a size that may be 0: an integer >= 0."""
    return _number(int, 0, text)


def scale(text: str) -> float:
    """A CFG scale: a finite number >= 0 (1 = no guidance)."""
    return _number(float, 0, text)


def positive(text: str) -> float:
    return _number(float, 0, text, strict=True)


def counts(text: str) -> list[int]:
    """A comma-separated list of integers >= 1, e.g. 1,2,4,8."""
    return [count(v) for v in text.split(",")]


def scales(text: str) -> list[float]:
    return [scale(v) for v in text.split(",")]


def names(text: str) -> list[str]:
    """A comma-separated list of names, empty items dropped (``dinov2,clip``)."""
    return [v for v in text.split(",") if v]

