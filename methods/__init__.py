"""Distillation methods, one small plugin per file; `METHODS` names them all."""

from .base import Method, MethodConfig
from .consistency import Consistency, ConsistencyConfig
from .dmd2 import DMD2, DMD2Config
from .progressive import Progressive, ProgressiveConfig
from .score import ScoreConfig, ScoreMethod
from .sid import SiD, SiDConfig
from .vsd import VSD, VSDConfig

METHODS: dict[str, type[Method]] = {
    "consistency": Consistency,
    "dmd2": DMD2,
    "progressive": Progressive,
    "sid": SiD,
    "vsd": VSD,
}

__all__ = ["METHODS", "Method", "MethodConfig", "Consistency", "ConsistencyConfig", "ScoreConfig", "ScoreMethod",
           "DMD2", "DMD2Config", "Progressive", "ProgressiveConfig", "SiD", "SiDConfig", "VSD", "VSDConfig"]
