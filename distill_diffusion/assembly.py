"""Assembly: a config becomes a `Run` (its roles, its method and its data) in one place.

The trainer assembles to train; loading a finished run for export, sampling and evaluation assembles to sample
(`distill_diffusion.rundir.load_finished_run`); tests assemble without any run directory. The method is asked once
what it needs (`Method.needs`), the factory builds complete roles from that, and then the method and the data are
made. Nothing here writes a file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import Config
from .data import MixtureData, PromptData, build_data, preflight
from .errors import ConfigError
from .factory import build_models
from .methods import METHODS, Method
from .roles import Models, Needs


@dataclass
class Run:
    cfg: Config
    needs: Needs  # what the method declared
    models: Models
    method: Method | None = None  # None when assembled to sample (no critic, no data)
    data: MixtureData | PromptData | None = None


def cfg_reading_methods() -> list[str]:
    """The methods whose students may read their CFG scale (``model.cfg_embedding_dim``)."""
    return sorted(name for name, cls in METHODS.items() if cls.needs(cls.config_class()).student_reads_cfg)


def assemble(cfg: Config, *, train: bool, pipeline: Any = None, device: torch.device | str = "cpu") -> Run:
    """The run ``cfg`` describes. ``train``: with the method, its critic and the data on ``device`` (frozen modules
    moved there); otherwise the teacher and a student to sample from (weights as built). ``pipeline``: the teacher
    as a diffusers pipeline already in memory, used instead of loading ``model.teacher``."""
    method_cls = METHODS[cfg.method]
    needs = method_cls.needs(cfg.method_args)
    if cfg.model.cfg_embedding_dim is not None and not needs.student_reads_cfg:
        raise ConfigError(f"model.cfg_embedding_dim (a student that reads its CFG scale) is for "
                          f"{' and '.join(cfg_reading_methods())}, whose teacher solver is guided; {cfg.method} "
                          "bakes its guidance in: set it to null")
    if train and cfg.model.teacher != "gmm":  # the mixture refuses data keys itself (build_data)
        preflight(cfg.data)  # a missing source or an unfinished cache is named before the teacher loads
    # 1. the roles, complete; fresh weights are seeded, so two runs with one seed start identical
    models = build_models(cfg.model, needs if train else replace(needs, critic=None), seed=cfg.train.seed,
                          pipeline=pipeline)
    if not train:
        return Run(cfg, needs, models)
    # 2. the method (it may add weights to a role, such as a GAN head on the critic)
    method = method_cls(cfg.method_args, models)
    # 3. the frozen modules on the device, then the data (prompts and real images are encoded there, in fp32)
    for module in models.frozen():
        module.to(device)
    data = build_data(models, cfg.data, device, cfg.train.seed)
    if needs.real_images is not None and not data.has_real:
        raise ConfigError(f"{cfg.method} as configured trains on real images ({needs.real_images}); set data.real to "
                          "digits or an image folder")
    return Run(cfg, needs, models, method, data)
