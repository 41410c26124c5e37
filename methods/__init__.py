"""Distillation methods, one small plugin per file; `METHODS` names them all."""

from .base import Method, MethodConfig
from .dmd2 import DMD2, DMD2Config

METHODS: dict[str, type[Method]] = {
    "dmd2": DMD2,
}

__all__ = ["METHODS", "Method", "MethodConfig", "DMD2", "DMD2Config"]
