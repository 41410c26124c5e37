"""Export a distilled student as a plain diffusers pipeline that carries its own sampling settings.

The student samples on a fixed timestep list: predict x0, re-noise it with fresh noise to the next timestep
(`distill_diffusion.sampling.multistep`). That is exactly diffusers' ``LCMScheduler.step`` with the
consistency boundary scalings negligible (c_skip <= 1e-7 at every student timestep, checked), so the export uses a
stock ``LCMScheduler`` whose ``original_inference_steps`` makes its default schedule the student's timesteps:
``original_inference_steps=4`` gives ``[999, 749, 499, 249]``. Students that sample with deterministic DDIM
(progressive distillation, ``Student.sampler == "ddim"``) export with a stock trailing ``DDIMScheduler`` instead, in
the teacher's own pipeline class.

- SD 1.x / 2.x teachers export as ``LatentConsistencyModelPipeline`` (same components as
  ``StableDiffusionPipeline``; it never doubles the batch for CFG): for 4-step students
  ``DiffusionPipeline.from_pretrained(OUT)(prompt)`` is the whole call.
- SDXL teachers export as ``StableDiffusionXLPipeline``; its default of 50 steps cannot be stored in the
  checkpoint, so the model card gives the exact call (``num_inference_steps=K``); CFG is off by itself (the UNet
  carries a zero CFG-scale embedding, `export_unet`).
- Students trained as LoRA adapters export also (``--lora``) as diffusers LoRA weights for the teacher's own
  pipeline class, with the scheduler beside them; the call adds ``guidance_scale=0``.
- Flow-matching transformer teachers (SD3 / SD3.5, Flux.1) export as their own pipeline class with the student's
  transformer and a stock ``FlowMatchLCMScheduler`` (``FlowMatchEulerDiscreteScheduler`` for DDIM-sampling
  students) without shift; no stock flow scheduler stores a step list, so the call names the student's ``sigmas``
  (and ``guidance_scale``: 0 for SD3, the trained embedded value for Flux.1-dev; the size where it is not the
  pipeline's default), as the model card shows (`flow_call_arguments`).

Everything is written under a temporary directory and renamed into place, safetensors only, with a model card
(``README.md``) and ``export.json`` (the call, the timesteps, the run it came from).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from distill_diffusion.errors import ConfigError
from distill_diffusion.factory import vae_factor, with_cfg_embedding
from distill_diffusion.files import replace_dir
from distill_diffusion.flow_nets import size_arguments
from distill_diffusion.rundir import load_finished_run

from .model_card import model_card

EXPORT_INFO = "export.json"
C_SKIP_MAX = 1e-7  # LCM boundary scaling left in the export's sampler: negligible against the 1e-4 parity bound
END_TIME_KEY = "time_text_embed.end_time_embed."  # a flow transformer's second-time embedding (`two_time`)
END_TIME_FILE = "end_time_embed.safetensors"
CFG_EMBEDDING_DIM = 256  # LCM's w-embedding width; the projection is zero (see `export_unet`)


def lcm_scheduler(teacher_scheduler_config: dict, timesteps: list[int]) -> Any:
    """A stock ``LCMScheduler`` on the teacher's noise schedule whose default schedule is the student's timesteps.

    LCM's boundary scalings c_skip = 0.25 / ((s t)^2 + 0.25), c_out = s t / sqrt((s t)^2 + 0.25) must leave the
    student's x0 untouched: with the default s = 10 they do (c_skip < 1e-7) for t >= 159; for smaller student
    timesteps the export stores a larger ``timestep_scaling`` in the config (no call argument is needed).
    """
    from diffusers import LCMScheduler

    if min(timesteps) < 1:
        raise ConfigError(f"student timesteps {list(timesteps)} include 0, which LCMScheduler cannot sample; "
                          "use timesteps >= 1")
    known = set(LCMScheduler.from_config({}).config)  # the teacher's DDPM-only keys (variance_type) are dropped
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in known}
    scaling = max(10.0, float(math.ceil(math.sqrt(0.25 / C_SKIP_MAX) / min(timesteps))))
    scheduler = LCMScheduler.from_config(config, original_inference_steps=len(timesteps), clip_sample=False,
                                         thresholding=False, timestep_scaling=scaling)
    for t in timesteps:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert abs(c_skip) <= C_SKIP_MAX and abs(1 - c_out) <= C_SKIP_MAX, (t, c_skip, c_out)
    return scheduler


def ddim_scheduler(teacher_scheduler_config: dict, timesteps: list[int]) -> Any:
    """A stock ``DDIMScheduler`` (eta 0, trailing spacing, final step to x0) whose K-step schedule is the student's
    timesteps: what a DDIM-sampling student (progressive distillation) computes."""
    from diffusers import DDIMScheduler

    known = set(DDIMScheduler.from_config({}).config)
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if k in known}
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing", set_alpha_to_one=True,
                                          clip_sample=False, thresholding=False)
    if _schedule(scheduler, num_inference_steps=len(timesteps)) != list(timesteps):
        raise ConfigError(f"student timesteps {list(timesteps)} are not DDIM's trailing {len(timesteps)}-step grid")
    return scheduler


def flow_scheduler(sampler: str) -> Any:
    """A stock flow-matching scheduler that samples as a flow teacher's student does, on sigmas given in the call:
    ``FlowMatchLCMScheduler`` (multistep: x0 = x - s u, then fresh noise to the next sigma, as `sampling.multistep`)
    or ``FlowMatchEulerDiscreteScheduler`` (ddim: the DDIM step on the straight path is the Euler step). No shift:
    the call's sigmas are the student's own."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler

    cls = FlowMatchEulerDiscreteScheduler if sampler in ("ddim", "flowmap") else FlowMatchLCMScheduler
    return cls(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def student_scheduler(models: Any) -> Any:
    """The stock scheduler that samples as the student does: LCMScheduler (multistep) or DDIMScheduler (ddim); their
    flow-matching counterparts for a flow teacher (`flow_scheduler`)."""
    if models.process.kind == "flow":
        return flow_scheduler(models.student.sampler)
    timesteps = [int(t) for t in models.student.timesteps]
    if models.student.sampler in ("ddim", "flowmap"):  # a flow map moves by DDIM between its timesteps
        return ddim_scheduler(models.pipeline.scheduler.config, timesteps)
    return lcm_scheduler(models.pipeline.scheduler.config, timesteps)


def _schedule(scheduler: Any, **kwargs: Any) -> list[int] | None:
    try:
        s = copy.deepcopy(scheduler)
        s.set_timesteps(**kwargs)
        return [int(t) for t in s.timesteps]
    except ValueError:
        return None


def call_arguments(scheduler: Any, timesteps: list[int], family: str, lora: bool,
                   cfg_scale: float | None = None) -> dict[str, Any]:
    """The fewest pipeline arguments that make the export sample on ``timesteps`` without CFG.

    Full exports carry a CFG-scale embedding (see `export_unet`), which turns CFG off in both
    ``LatentConsistencyModelPipeline`` and ``StableDiffusionXLPipeline``; a LoRA applied to the teacher's own
    pipeline does not, so there ``guidance_scale=0`` is part of the call. A student that reads its CFG scale
    (``cfg_scale``: its default scale) reads ``guidance_scale`` through that embedding, so the call names it.
    """
    k = len(timesteps)
    lcm_pipe = family == "sd" and type(scheduler).__name__ == "LCMScheduler"
    if not lora and lcm_pipe and k == 4 and _schedule(scheduler, num_inference_steps=4) == list(timesteps):
        kwargs: dict[str, Any] = {}  # LatentConsistencyModelPipeline's default num_inference_steps is 4
    elif _schedule(scheduler, num_inference_steps=k) == list(timesteps):
        kwargs = {"num_inference_steps": k}
    else:
        kwargs = {"timesteps": list(timesteps)}
    if lora:
        kwargs["guidance_scale"] = 0.0
    elif cfg_scale is not None:
        kwargs["guidance_scale"] = float(cfg_scale)
    return kwargs


def flow_call_arguments(models: Any, timesteps: list[float]) -> dict[str, Any]:
    """The call of a flow-transformer export: the student's sigmas (no stock flow scheduler stores a step list),
    CFG off (``guidance_scale`` 0 for SD3, whose default 7 would double the batch), Flux.1-dev's embedded guidance
    value as trained, and the image size where it is not the pipeline's default."""
    kwargs: dict[str, Any] = {"sigmas": [float(t) / models.process.num_train_timesteps for t in timesteps]}
    pipe = models.pipeline
    if models.text.guidance is not None:
        kwargs["guidance_scale"] = float(models.text.guidance)
    elif models.family in ("sd3", "sana"):
        kwargs["guidance_scale"] = 0.0
    elif models.family == "qwen":  # CFG is off without a negative prompt; 1 says so (the default 4 draws a warning)
        kwargs["true_cfg_scale"] = 1.0
    size = int(models.sample_shape[-1]) * vae_factor(pipe)
    # the size the pipeline samples without being told (SANA's __call__ defaults to 1024 whatever the model)
    default = pipe.default_sample_size * pipe.vae_scale_factor if hasattr(pipe, "default_sample_size") else 1024
    if size != default:
        kwargs.update(size_arguments(pipe, size))
    return kwargs


def export_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The student's UNet as a plain ``UNet2DConditionModel``: any LoRA adapter folded into the weights, and a
    CFG-scale embedding (``time_cond_proj_dim``, as LCM's UNets have): the student's own when it reads its scale
    (``model.cfg_embedding_dim``), else one whose projection is exactly zero.

    The zero projection adds nothing to the time embedding, so the network computes what the student computes;
    it is there because diffusers' ``LatentConsistencyModelPipeline`` requires one and because with it
    ``StableDiffusionXLPipeline`` skips CFG by itself, so neither export needs ``guidance_scale`` in its call.
    """
    from diffusers import UNet2DConditionModel

    if getattr(unet, "_hf_peft_config_loaded", False):
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    if not isinstance(unet, UNet2DConditionModel):  # a flow transformer: a peft-free copy of the same class
        plain = type(unet).from_config(unet.config)  # (a flow-map student's second time is saved apart)
        plain.load_state_dict({k: v for k, v in unet.state_dict().items() if END_TIME_KEY not in k})
        return plain.eval()
    if unet.config.time_cond_proj_dim is None:
        return with_cfg_embedding(unet, CFG_EMBEDDING_DIM).eval()
    plain = UNet2DConditionModel.from_config(unet.config)  # a peft-free copy of the w-conditioned student's UNet
    plain.load_state_dict(unet.state_dict())
    return plain.eval()


def end_time_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A flow transformer student's second-time embedding (`two_time`), keyed as a ``TimestepEmbedding``."""
    return {k.split(END_TIME_KEY, 1)[1]: v.detach().float().cpu().contiguous()
            for k, v in net.state_dict().items() if END_TIME_KEY in k}


def lora_state(unet: torch.nn.Module, adapter: str = "student") -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers-format LoRA weights of the student's adapter, and the adapter's config (rank, alpha, targets)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    config = unet.peft_config[adapter].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}, config


def export(run_dir: str | Path, out_dir: str | Path, lora: bool = False, overwrite: bool = False) -> Path:
    """Write the student of ``run_dir`` to ``out_dir`` as a diffusers pipeline (or, with ``lora``, LoRA weights)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"export directory {str(out_dir)!r} exists; pass --overwrite or choose another")
    run = load_finished_run(run_dir)
    cfg, models = run.cfg, run.models
    if models.family == "gmm":
        raise ConfigError("a Gaussian-mixture run has no diffusers export; export runs whose teacher is a "
                          "diffusers pipeline (embedded:digits, tiny:*, a pipeline directory)")
    unet = models.student.denoiser.net
    is_lora = getattr(unet, "_hf_peft_config_loaded", False)
    if lora and not is_lora:
        raise ConfigError("--lora needs a student trained as a LoRA adapter (model.student_lora_rank); this "
                          "run's student has full weights: export it without --lora")
    flow = models.process.kind == "flow"
    # a flow-map student reads where each step ends: a UNet through its stock class embedding (`class_labels`), a
    # flow transformer through an embedding no stock class has, saved beside it; the model card's loading step
    end_time = None if models.student.sampler != "flowmap" else "embedding" if flow else "class_labels"
    if end_time and lora:
        raise ConfigError("a flow-map student has no LoRA export: its second time embedding is outside the adapter")
    timesteps = [t if flow else int(t) for t in models.student.timesteps]
    scheduler = student_scheduler(models)
    kwargs = (flow_call_arguments(models, timesteps) if flow else
              call_arguments(scheduler, timesteps, models.family, lora, models.student.cfg_scale))

    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if lora:
            state, lora_config = lora_state(unet)
            net = "transformer" if flow else "unet"
            type(models.pipeline).save_lora_weights(tmp, **{f"{net}_lora_layers": state,
                                                            f"{net}_lora_adapter_metadata": lora_config})
            scheduler.save_pretrained(tmp / "scheduler")
            pipeline_class = type(models.pipeline).__name__  # the adapter goes on the teacher's own pipeline
        else:
            pipe = _export_pipeline(models, export_unet(unet), scheduler)
            pipe.save_pretrained(tmp, safe_serialization=True)
            if end_time == "embedding":
                from safetensors.torch import save_file

                save_file(end_time_state(unet), str(tmp / END_TIME_FILE))
            pipeline_class = type(pipe).__name__
        info = {"pipeline_class": pipeline_class, "teacher_class": type(models.pipeline).__name__,
                "scheduler_class": type(scheduler).__name__,
                "teacher": cfg.model.teacher, "method": cfg.method, "timesteps": timesteps, "call": kwargs,
                "lora": lora, "run": str(run_dir),
                # a flow-map student's UNet reads where each step ends: the model card's one loading step
                "end_time_hook": end_time,
                # the pipeline re-noises from torch's global generator: seed it per image to reproduce a sample
                "seed_global_rng": models.student.sampler == "multistep" and len(timesteps) > 1
                and models.student.denoiser.renoise_from_global_rng}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1))
        model_card(cfg, info).save(tmp / "README.md")
        _check_no_pickles(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return out_dir


def export_run(run_dir: str | Path, lora_student: bool) -> dict[str, Path]:
    """The end of every image run: ``RUN/export`` (and ``RUN/export_lora`` for a LoRA student), replaced if there."""
    run_dir = Path(run_dir)
    out = {"export": export(run_dir, run_dir / "export", overwrite=True)}
    if lora_student:
        out["export_lora"] = export(run_dir, run_dir / "export_lora", lora=True, overwrite=True)
    return out


def update_card(export_dir: str | Path, cfg: Any, sweep_table: str | None) -> None:
    """Rewrite an export's model card (e.g. once its sweep has run), atomically."""
    export_dir = Path(export_dir)
    info = json.loads((export_dir / EXPORT_INFO).read_text())
    tmp = export_dir / ".README.md.tmp"
    model_card(cfg, info, sweep_table).save(tmp)
    os.replace(tmp, export_dir / "README.md")


def _export_pipeline(models: Any, unet: torch.nn.Module, scheduler: Any) -> Any:
    """The teacher's components with the student's UNet and the student's scheduler."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    teacher = models.pipeline
    if models.process.kind == "flow":  # the teacher's own pipeline class: SD3 / Flux
        return type(teacher)(**{**teacher.components, "transformer": unet, "scheduler": scheduler})
    if models.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=teacher.config.force_zeros_for_empty_prompt, add_watermarker=False,
        )
    cls = LatentConsistencyModelPipeline if type(scheduler).__name__ == "LCMScheduler" else StableDiffusionPipeline
    return cls(
        vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _check_no_pickles(root: Path) -> None:
    bad = [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    if bad:
        raise RuntimeError(f"export wrote non-safetensors weights: {[str(p) for p in bad]}")
