"""The one factory that builds the three roles from a config; the only place model files are read.

Teachers: ``gmm`` (the exact Gaussian-mixture denoiser), ``tiny:sd15`` / ``tiny:sd21`` / ``tiny:sdxl`` (tiny random
diffusers pipelines built offline from config), or a diffusers pipeline directory holding a
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``. Students and critics start as copies of the teacher.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig, first_line
from .denoiser import Denoiser
from .gmm import GaussianMixture, MixtureDenoiserNet, ResidualMLP
from .lora import SharedDenoiser, add_lora
from .process import NoiseProcess
from .roles import Models, Student, Teacher
from .text import TextConditioner

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def build_models(cfg: ModelConfig, need_critic: bool, seed: int = 0, critic_lora_rank: int = 0,
                 pipeline: Any = None, frozen_critic: bool = False) -> Models:
    """Teacher, student and (when ``need_critic``) critic for ``cfg.teacher``; fresh weights are seeded by ``seed``.

    ``critic_lora_rank`` is the method's default critic (0: full weights); ``model.critic_lora_rank`` overrides it.
    ``frozen_critic`` (the method's default when ``model.critic_lora_rank`` is unset): the critic is the teacher's own
    frozen network, for methods that train only heads on its features (LADD); the exact mixture teacher has no
    features, so there the critic is a trainable network that also reads the teacher's epsilon prediction of its
    input (what a UNet's features carry about a noised image: its deviation from the teacher's denoising, scaled by
    1 / sigma_t).
    ``pipeline``: a diffusers pipeline object already in memory, used instead of loading ``cfg.teacher``.
    """
    want_critic = need_critic if cfg.critic is None else cfg.critic
    rank = cfg.critic_lora_rank if cfg.critic_lora_rank is not None else critic_lora_rank
    if cfg.teacher == "gmm":
        if cfg.student_lora_rank is not None or (cfg.critic_lora_rank or 0) > 0:
            raise ConfigError("LoRA roles (model.student_lora_rank, model.critic_lora_rank) need a diffusers teacher; "
                              "a mixture critic already is a small correction on the frozen exact teacher")
        return _build_mixture(cfg, want_critic, seed, want_critic and frozen_critic)
    pipe = pipeline if pipeline is not None else load_pipeline(cfg.teacher)
    frozen = want_critic and frozen_critic and cfg.critic_lora_rank is None
    return _build_diffusers(cfg, want_critic, pipe, seed, rank if want_critic and not frozen else 0, frozen)


def _build_mixture(cfg: ModelConfig, want_critic: bool, seed: int, teacher_features: bool = False) -> Models:
    from diffusers import DDPMScheduler

    # SD 1.5's schedule: 1000 steps, scaled_linear 0.00085 .. 0.012, so alpha_bar(999) ~ 0.0047 > 0.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    process = NoiseProcess.from_scheduler_config(dict(scheduler.config, prediction_type="sample"))
    mixture = GaussianMixture.ring(cfg.gmm_classes, cfg.gmm_radius, cfg.gmm_std, cfg.gmm_dim)
    exact = MixtureDenoiserNet(mixture, process)
    data_var = float((mixture.means**2).sum(1).mean() / mixture.dim + mixture.std**2)
    gen = torch.Generator().manual_seed(seed)

    def mlp(guidance_dim: int | None = None, eps_features: bool = False) -> Denoiser:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            net = ResidualMLP(exact, process, mixture.dim, mixture.classes, cfg.mlp_hidden, cfg.mlp_layers, data_var,
                              guidance_dim, eps_features)
        return Denoiser(net, process)

    return Models(
        process=process,
        teacher=Teacher(Denoiser(exact, process)),
        student=Student(mlp(cfg.guidance_embedding), cfg.timesteps, guidance=_w_default(cfg)),
        critic=mlp(eps_features=teacher_features) if want_critic else None,
        family="gmm",
        sample_shape=(mixture.dim,),
        mixture=mixture,
        pipeline=scheduler,
        seed=seed,
    )


def load_pipeline(spec: str) -> Any:
    """A diffusers pipeline from ``tiny:<kind>`` or a local directory (offline; never downloads)."""
    from diffusers import DiffusionPipeline

    if spec.startswith("tiny:"):
        from .tiny import tiny_pipeline

        return tiny_pipeline(spec.split(":", 1)[1])
    if spec.startswith("embedded:"):
        from . import zoo

        return zoo.load(spec)
    path = Path(spec)
    if not path.is_dir() and HUB_ID.fullmatch(spec):
        return _from_hub(spec)
    if not path.is_dir():
        raise ConfigError(
            f"teacher {spec!r} is not a directory; give gmm, embedded:digits, tiny:sd15, tiny:sd21, tiny:sdxl, a "
            "diffusers pipeline directory or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"teacher {spec!r} is not a diffusers pipeline directory (no model_index.json)")
    return DiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _from_hub(repo: str) -> Any:
    """A pipeline by hub id (downloaded or from the local cache; remote code is never trusted)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo, safety_checker=None)
    except (OSError, ValueError) as e:  # offline, unknown repo, gated repo: huggingface_hub's errors are OSErrors
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if constants.HF_HUB_OFFLINE else \
            first_line(e)[:200]
        raise ConfigError(f"teacher {repo!r} is not a local directory and could not be loaded from the Hugging Face "
                          f"hub ({reason}); download it where there is network, or give a local pipeline "
                          "directory") from None


def _build_diffusers(cfg: ModelConfig, want_critic: bool, pipe: Any, seed: int = 0,
                     critic_lora_rank: int = 0, frozen_critic: bool = False) -> Models:
    from diffusers import UNet2DConditionModel

    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES or not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise ConfigError(f"teacher pipeline class {name!r} is not supported; choose one of: "
                          f"{', '.join(SUPPORTED_PIPELINES)}")
    process = NoiseProcess.from_scheduler(pipe.scheduler)
    unet = pipe.unet
    sdxl = name == "StableDiffusionXLPipeline"
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = unet.config.sample_size * vae_scale
    if sdxl:
        text = TextConditioner([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                               sdxl=True, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                               image_size=(size, size))
    else:
        text = TextConditioner([pipe.tokenizer], [pipe.text_encoder])
    for module in (pipe.vae, *text.encoders):
        module.requires_grad_(False).eval()
    # Full-weight roles are copies of the teacher's UNet, taken before any adapter joins it; LoRA roles are adapters
    # on the teacher's UNet itself (the teacher computes with every adapter off).
    lora_student = cfg.student_lora_rank is not None
    lora_critic = want_critic and critic_lora_rank > 0
    student: Denoiser = (SharedDenoiser(unet, process, adapter="student") if lora_student else
                         Denoiser(_student_unet(unet, cfg.guidance_embedding).requires_grad_(True).train(), process))
    critic: Denoiser | None = None
    if want_critic and frozen_critic:  # the teacher's own network (adapters off), frozen; heads may join it
        critic = SharedDenoiser(unet, process, adapter=None) if lora_student else Denoiser(unet, process)
    elif want_critic:
        critic = (SharedDenoiser(unet, process, adapter="critic") if lora_critic
                  else Denoiser(copy.deepcopy(unet).requires_grad_(True).train(), process))
    teacher = Teacher(SharedDenoiser(unet, process, adapter=None) if lora_student or lora_critic
                      else Denoiser(unet, process))  # freezes the base; the adapters join it after
    if lora_student:
        add_lora(unet, cfg.student_lora_rank, cfg.student_lora_alpha, cfg.lora_targets, seed, name="student")
    if lora_critic:
        add_lora(unet, critic_lora_rank, cfg.critic_lora_alpha, cfg.lora_targets, seed + 1, name="critic")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return Models(
        process=process,
        teacher=teacher,
        student=Student(student, cfg.timesteps, guidance=_w_default(cfg)),
        critic=critic,
        family="sdxl" if sdxl else "sd",
        sample_shape=shape,
        text=text,
        vae=pipe.vae,
        pipeline=pipe,
        seed=seed,
    )


def _w_default(cfg: ModelConfig) -> float | None:
    """A w-conditioned student's guidance scale until its method sets the one it samples at (`Student.guidance`)."""
    return 1.0 if cfg.guidance_embedding is not None else None


def _student_unet(unet: Any, guidance_dim: int | None) -> Any:
    """A full-weight copy of the teacher's UNet; with ``guidance_dim``, one that also reads a CFG-scale embedding
    (`with_guidance_embedding`: LCM's ``time_cond_proj_dim``, starting at zero so the student starts as the teacher;
    LCM's script initialises it at random)."""
    if guidance_dim is None or unet.config.time_cond_proj_dim == guidance_dim:
        return copy.deepcopy(unet)
    if unet.config.time_cond_proj_dim is not None:
        raise ConfigError(f"the teacher's UNet already reads a guidance embedding of width "
                          f"{unet.config.time_cond_proj_dim}; set model.guidance_embedding to that or null")
    return with_guidance_embedding(unet, guidance_dim).to(unet.device, unet.dtype)


def with_guidance_embedding(unet: Any, dim: int) -> Any:
    """A new plain ``UNet2DConditionModel`` holding ``unet``'s weights plus a guidance embedding of width ``dim``
    (diffusers' ``time_cond_proj_dim``) whose projection is exactly zero, so it computes what ``unet`` computes. The
    w-conditioned student starts from it; exports of students without one get it (`pipelines.export.export_unet`)."""
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_config(dict(unet.config, time_cond_proj_dim=dim))
    missing, unexpected = plain.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"UNet does not fit a guidance embedding: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        plain.time_embedding.cond_proj.weight.zero_()
    return plain
