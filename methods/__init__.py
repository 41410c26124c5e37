"""Distillation methods, one small plugin per file; `METHODS` names them all."""

from .adversarial import ADD, LADD, ADDConfig, LADDConfig
from .base import Method, MethodConfig
from .consistency import Consistency, ConsistencyConfig
from .dmd2 import DMD2, DMD2Config
from .meanflow import MeanFlow, MeanFlowConfig
from .progressive import Progressive, ProgressiveConfig
from .rcm import RCM, RCMConfig
from .scm import SCM, SCMConfig
from .score import ScoreConfig, ScoreMethod
from .sid import SiD, SiDConfig
from .tdm import TDM, TDMConfig
from .vsd import VSD, VSDConfig

METHODS: dict[str, type[Method]] = {
    "add": ADD,
    "consistency": Consistency,
    "dmd2": DMD2,
    "ladd": LADD,
    "meanflow": MeanFlow,
    "progressive": Progressive,
    "rcm": RCM,
    "scm": SCM,
    "sid": SiD,
    "tdm": TDM,
    "vsd": VSD,
}

__all__ = ["METHODS", "Method", "MethodConfig", "ADD", "ADDConfig", "Consistency",
           "ConsistencyConfig", "DMD2", "DMD2Config", "LADD", "LADDConfig",
           "MeanFlow", "MeanFlowConfig", "Progressive", "ProgressiveConfig",
           "RCM", "RCMConfig", "SCM", "SCMConfig",
           "ScoreConfig", "ScoreMethod", "SiD", "SiDConfig", "TDM", "TDMConfig", "VSD", "VSDConfig"]
