"""Generate images from any model the toolkit names, with per-image seeds, timing every batch.

A model is ``embedded:digits``, a diffusers pipeline directory (sampled by the pipeline itself with a stock
scheduler: ``ddim``, ``euler`` or ``dpmpp``, trailing timestep spacing), a run directory of this toolkit (its
student's own few-step sampler), or an export of one (plain diffusers with the export's own scheduler and call).
Image i always starts from ``torch.randn`` of a generator seeded with seeds[i] and shape (1, C, h, w), as diffusers
draws per-image noise from a list of generators, so a teacher and a student sampled with the same seeds start from
the same noise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill_diffusion import zoo
from distill_diffusion.assembly import Run
from distill_diffusion.errors import ConfigError, first_line
from distill_diffusion.latents import decode
from distill_diffusion.rundir import load_finished_run
from distill_diffusion.teachers import from_directory

SOLVERS = ("ddim", "euler", "dpmpp")


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")
    return name


def make_scheduler(name: str, config: Any) -> Any:
    """A stock diffusers scheduler for the teacher's config, with trailing spacing so step 1 starts at t=T-1.

    A flow-matching teacher (SD3, Flux) keeps its own ``FlowMatchEulerDiscreteScheduler`` (its shift, and Flux's
    resolution-dependent shift) for ``euler`` and ``ddim`` (DDIM on the straight path is the Euler step), and
    ``dpmpp`` is DPM-Solver++(2M) on the same flow sigmas (``use_flow_sigmas``, as diffusers configures it for SANA,
    whose own scheduler that is; its ``euler`` is the flow Euler with SANA's ``flow_shift``).
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    config = dict(config)
    if config.get("use_flow_sigmas"):  # SANA's DPM-Solver on flow sigmas: its shift is `flow_shift`
        if name in ("euler", "ddim"):
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config["num_train_timesteps"],
                                                   shift=config["flow_shift"])
        if name == "dpmpp":
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if str(config.get("_class_name", "")).startswith("FlowMatch") or "shift" in config:
        if name in ("euler", "ddim"):
            return FlowMatchEulerDiscreteScheduler.from_config(config)
        if name == "dpmpp":
            if config.get("use_dynamic_shifting"):
                raise ValueError("dpmpp has no resolution-dependent shift (Flux's scheduler); use euler")
            return DPMSolverMultistepScheduler(num_train_timesteps=config["num_train_timesteps"],
                                               algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                               prediction_type="flow_prediction", flow_shift=config["shift"])

    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing")
    raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")


@dataclass
class EvalModel:
    """A model as evaluation sees it: a teacher pipeline, a finished run's student, or an export of one."""

    name: str
    pipeline: Any = None  # a diffusers pipeline (teachers and exports)
    run: Run | None = None  # a finished run, assembled to sample (its student's trained weights loaded)
    export: dict | None = None  # export.json of an exported student: its timesteps and pipeline call

    @property
    def is_student(self) -> bool:
        return self.run is not None or self.export is not None

    @property
    def timesteps(self) -> list:
        return self.export["timesteps"] if self.export is not None else list(self.run.models.student.timesteps)

    @property
    def student_steps(self) -> int:
        return len(self.timesteps)


def load_model(spec: str) -> EvalModel:
    if spec.startswith(zoo.PREFIX):
        return EvalModel(spec, pipeline=zoo.load(spec))
    path = Path(spec)
    if (path / "config.yaml").is_file():
        return EvalModel(spec, run=load_finished_run(path))
    if (path / "model_index.json").is_file():
        pipe = from_directory(path, "pipeline")
        pipe.set_progress_bar_config(disable=True)
        info = path / "export.json"
        try:
            export = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{str(info)!r} is damaged ({first_line(e)}); export the run again") from None
        if export is not None and export.get("end_time_hook"):  # a flow-map student: its model card's loading step
            from distill_diffusion.pipelines import end_time

            if export["end_time_hook"] == "class_labels":
                end_time.add_end_time_hook(pipe)
            else:
                end_time.add_end_time_embedding(pipe, str(path))
        return EvalModel(spec, pipeline=pipe, export=export)
    raise ConfigError(f"model {spec!r} is neither embedded:<name>, a diffusers pipeline directory nor a run directory")


def _seeded_call(model: EvalModel, prompts: list[str], seed: int) -> np.ndarray:
    """One image the way an SD3 / Flux export's model card calls it: the pipeline re-noises from torch's global
    generator, so it is seeded first (and restored after, so the caller's random state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.pipeline(prompt=prompts, generator=[torch.Generator().manual_seed(seed)], output_type="np",
                              **model.export["call"]).images


def _teacher_images(pipe: Any, prompts: list[str], seeds: list[int], steps: int | None, cfg_scale: float,
                    solver: str) -> np.ndarray:
    """A teacher pipeline's own sampling at ``steps`` with a stock ``solver``, each image from its seed's noise.
    Flux.1-dev reads ``cfg_scale`` as its embedded guidance (FluxPipeline's ``guidance_scale``), without a second
    branch; Flux's latents go in packed, at the VAE's image size (its pipeline's own default is 1024 whatever the
    model)."""
    from distill_diffusion.factory import image_size, vae_factor
    from distill_diffusion.flow_nets import PACKED, pack, size_arguments
    from distill_diffusion.latents import latent_channels

    pipe.scheduler = make_scheduler(solver, pipe.scheduler.config)
    size = image_size(pipe)
    noise = _noise(seeds, (latent_channels(pipe.vae), size // vae_factor(pipe), size // vae_factor(pipe)))
    extra: dict[str, Any] = {}
    name = type(pipe).__name__
    if name in ("FluxPipeline", "SanaPipeline", "QwenImagePipeline"):  # default sizes that do not follow the model's
        extra = size_arguments(pipe, size)
    if type(getattr(pipe, "transformer", None)).__name__ in PACKED:
        noise = pack(noise)
    if name == "QwenImagePipeline":  # true CFG: the empty negative prompt, at true_cfg_scale
        extra.update(true_cfg_scale=cfg_scale, negative_prompt=[" "] * len(prompts) if cfg_scale > 1 else None)
        return pipe(prompt=prompts, num_inference_steps=steps, latents=noise, output_type="np", **extra).images
    return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=cfg_scale, latents=noise,
                output_type="np", **extra).images


def _noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil arithmetic


@torch.no_grad()
def generate(model: EvalModel, prompts: list[str], seeds: list[int], steps: int | None = None, cfg_scale: float = 1.0,
             solver: str = "ddim", batch_size: int = 250, progress: bool = True,
             as_float: bool = False) -> tuple[np.ndarray, float]:
    """Images (N, H, W, 3) for prompts[i] / seeds[i] (uint8, or floats in [0, 1] with ``as_float``) and the total
    sampling seconds (model time only)."""
    convert = (lambda a: a) if as_float else _to_uint8
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    out, seconds = [], 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"{Path(model.name).name} {solver}/{steps}",
                  disable=not progress):
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        t0 = time.perf_counter()
        if model.export is not None and model.export.get("seed_global_rng"):  # the model card's per-seed call
            images = convert(np.concatenate([_seeded_call(model, [prompt], seed) for prompt, seed in zip(p, s)]))
        elif model.export is not None:  # exactly what a diffusers user runs, per-image generators
            gens = [torch.Generator().manual_seed(k) for k in s]
            images = convert(model.pipeline(prompt=p, generator=gens, output_type="np",
                                            **model.export["call"]).images)
        elif model.run is not None:
            models = model.run.models
            cond = models.text.encode(p)
            # per-image generators: image i's start noise and re-noising depend on seeds[i] alone
            gens = [torch.Generator().manual_seed(k) for k in s]
            noise = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in gens])
            x = models.student.sample(noise, cond, gens)
            images = decode(models, x, as_float)
        else:
            images = convert(_teacher_images(model.pipeline, p, s, steps, cfg_scale, solver))
        seconds += time.perf_counter() - t0
        out.append(images)
    return np.concatenate(out), seconds
