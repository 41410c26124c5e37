"""The two kinds of failure the toolkit reports as one line: bad input (`ConfigError`) and a run that cannot go on
(`RunError`). Every module raises these; none of them imports anything of the package."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem, reported as one line naming what was wrong and what is allowed."""


class RunError(RuntimeError):
    """A run that cannot go on (a checkpoint that cannot be written, losses that stay non-finite), reported as one
    line; what was written before it stays intact."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
