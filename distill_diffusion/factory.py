"""The one factory that builds the roles of a run from its `ModelConfig` and its method's `Needs`, complete: nothing
patches a role after it is built. The only place teacher weights are read (through `distill_diffusion.teachers`).

Teacher families, one builder each: the exact Gaussian mixture (``gmm``: a known answer, `_mixture_models`), UNet
latent-diffusion pipelines (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``: `_unet_models`) and
flow-matching transformer pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``: `_transformer_models`), found by
the pipeline's class in `BUILDERS`. Students and critics start as copies of the teacher, or as LoRA adapters on its
own network.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .config import ModelConfig
from .denoiser import Denoiser
from .errors import ConfigError
from .gmm import GaussianMixture, MixtureDenoiserNet, ResidualMLP
from .latents import latent_channels
from .lora import SharedDenoiser, add_lora
from .process import NoiseProcess
from .roles import Models, Needs, Student, Teacher
from .teachers import load_pipeline, unet_with_config
from .text import PipelineTextConditioner, TextConditioner
from .time_lowpass import lowpass_time_input
from .two_time import with_end_time


def critic_kind(needs: Needs, cfg: ModelConfig) -> tuple[str | None, int]:
    """The critic to build, as (kind, LoRA rank); ``model.critic_lora_rank`` overrides the method's choice:

        method's critic (Needs)    model.critic_lora_rank    built
        none                       any                       no critic
        copy / lora r / teacher    null                      the method's choice
        copy / lora r / teacher    0                         a trainable full copy of the teacher's network
        copy / lora r / teacher    r' > 0                    a LoRA adapter of rank r' on the teacher's network
    """
    if needs.critic is None:
        return None, 0
    if cfg.critic_lora_rank is None:
        return needs.critic, needs.critic_lora_rank if needs.critic == "lora" else 0
    return ("lora", cfg.critic_lora_rank) if cfg.critic_lora_rank > 0 else ("copy", 0)


def build_models(cfg: ModelConfig, needs: Needs, seed: int = 0, pipeline: Any = None) -> Models:
    """Teacher, student and (when the method has one) critic for ``cfg.teacher``; fresh weights are seeded by
    ``seed``. ``pipeline``: the teacher as a diffusers pipeline already in memory, used instead of loading it."""
    critic, rank = critic_kind(needs, cfg)
    student_cfg = needs.student_cfg if cfg.cfg_embedding_dim is not None else None  # None: guidance baked in
    if cfg.teacher == "gmm":
        return _mixture_models(cfg, needs, student_cfg, critic, seed)
    pipe = pipeline if pipeline is not None else load_pipeline(cfg.teacher)
    name = type(pipe).__name__
    if name not in BUILDERS:
        raise ConfigError(f"teacher pipeline class {name!r} is not supported; choose one of: {', '.join(BUILDERS)}")
    return BUILDERS[name](cfg, pipe, needs, student_cfg, critic, rank, seed)


def _mixture_models(cfg: ModelConfig, needs: Needs, student_cfg: float | None, critic: str | None,
                    seed: int) -> Models:
    """The exact mixture teacher; student and critic are the teacher plus a small MLP correction. A critic that is
    the frozen teacher elsewhere (heads on its features) is a trainable MLP here that also reads the teacher's
    epsilon prediction of its input (what a UNet's features carry about a noised image: its deviation from the
    teacher's denoising, scaled by 1 / sigma_t); a LoRA critic is a plain one (the MLP is already a small
    correction on the frozen exact teacher)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if cfg.student_lora_rank is not None or (cfg.critic_lora_rank or 0) > 0:
        raise ConfigError("LoRA roles (model.student_lora_rank, model.critic_lora_rank) need a diffusers teacher; "
                          "a mixture critic already is a small correction on the frozen exact teacher")
    if cfg.gmm_process == "flow":  # SD3 / Flux's path: x_t = (1 - s) x0 + s eps, s = t / 1000, t in [0, 1000]
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        process = NoiseProcess.from_scheduler(scheduler)
    else:  # SD 1.5's schedule: 1000 steps, scaled_linear 0.00085 .. 0.012, so alpha_bar(999) ~ 0.0047 > 0.
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False)
        process = NoiseProcess.from_scheduler_config(dict(scheduler.config, prediction_type="sample"))
    mixture = GaussianMixture.ring(cfg.gmm_classes, cfg.gmm_radius, cfg.gmm_std, cfg.gmm_dim, cfg.gmm_weights)
    mixture.conditional = not cfg.gmm_unconditional
    exact = MixtureDenoiserNet(mixture, process)
    data_var = float((mixture.means**2).sum(1).mean() / mixture.dim + mixture.std**2)
    gen = torch.Generator().manual_seed(seed)

    def mlp(cfg_dim: int | None = None, eps_features: bool = False) -> Denoiser:
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            net = ResidualMLP(exact, process, mixture.dim, mixture.classes, cfg.mlp_hidden, cfg.mlp_layers, data_var,
                              cfg_dim, eps_features, cfg.mlp_smooth)
        return Denoiser(net, process, "sample")

    student_denoiser = mlp(cfg.cfg_embedding_dim)
    if needs.student_sampler == "flowmap":
        with_end_time(student_denoiser.net)
    student = Student(student_denoiser, cfg.timesteps, needs.student_sampler, student_cfg)
    return Models(
        process=process,
        teacher=Teacher(Denoiser(exact, process, "sample")),  # the mixture networks predict x0 on either path
        student=student,
        critic=None if critic is None else mlp(eps_features=critic == "teacher"),
        family="gmm",
        sample_shape=(mixture.dim,),
        mixture=mixture,
        pipeline=scheduler,
        seed=seed,
    )


def vae_factor(pipe: Any) -> int:
    """How many image pixels one latent pixel spans (the VAE's downsampling)."""
    return int(pipe.vae_scale_factor)


def image_size(pipe: Any, resolution: int | None = None) -> int:
    """The image resolution: ``resolution`` when given, else the teacher's own: its UNet's or SD3 transformer's latent
    size times the VAE's downsampling; Flux's transformer has no size, so its VAE's ``sample_size`` (1024 for
    Flux.1, FluxPipeline's default too)."""
    if resolution is not None:
        return int(resolution)
    net = getattr(pipe, "unet", None) or pipe.transformer
    size = getattr(net.config, "sample_size", None)
    if size is None or type(net).__name__ == "FluxTransformer2DModel":
        vae_size = pipe.vae.config.get("sample_size")  # Qwen-Image's VAE has none: the pipeline's own default
        return int(vae_size or pipe.default_sample_size * vae_factor(pipe))
    return int(size) * vae_factor(pipe)


def text_conditioner(pipe: Any, resolution: int | None = None, guidance: float = 3.5) -> Any:
    """The pipeline's frozen text encoders as a conditioner (`TextConditioner`, or `PipelineTextConditioner` for the
    flow transformers; ``guidance``: Flux.1-dev's embedded guidance), its VAE frozen too: what training, prompt
    caches and previews encode prompts with."""
    size = image_size(pipe, resolution)
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        text = TextConditioner([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                               sdxl=True, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                               image_size=(size, size))
    elif name in FLOW_BUILDERS:
        embeds_guidance = name == "FluxPipeline" and pipe.transformer.config.guidance_embeds
        text = PipelineTextConditioner(pipe, guidance if embeds_guidance else None)
    else:
        text = TextConditioner([pipe.tokenizer], [pipe.text_encoder])
    for module in (pipe.vae, *text.encoders):
        module.requires_grad_(False).eval()
    return text


def _network_roles(net: Any, student_net: Any, process: NoiseProcess, cfg: ModelConfig, critic: str | None,
                   critic_rank: int, seed: int) -> tuple[Teacher, Denoiser, Denoiser | None]:
    """Teacher, student and critic denoisers on a teacher network ``net`` (a UNet or a transformer). Full-weight roles
    are copies of it (``student_net``: the student's, made by the caller), taken before any adapter joins it; LoRA
    roles are adapters on ``net`` itself (the teacher computes with every adapter off); a ``teacher`` critic is
    ``net``, frozen (adapters off), which heads may join."""
    lora_student = cfg.student_lora_rank is not None
    shared = lora_student or critic == "lora"  # the teacher's network carries adapters: each role picks its own
    student = (SharedDenoiser(net, process, adapter="student") if lora_student else
               Denoiser(student_net.float().requires_grad_(True).train(), process))  # fp32 master weights
    critic_denoiser: Denoiser | None = None
    if critic == "teacher":
        critic_denoiser = SharedDenoiser(net, process, adapter=None) if lora_student else Denoiser(net, process)
    elif critic == "lora":
        critic_denoiser = SharedDenoiser(net, process, adapter="critic")
    elif critic == "copy":
        critic_denoiser = Denoiser(copy.deepcopy(net).float().requires_grad_(True).train(), process)
    teacher = Teacher(SharedDenoiser(net, process, adapter=None) if shared else Denoiser(net, process))
    if lora_student:  # the teacher froze the base above; the adapters join it now
        add_lora(net, cfg.student_lora_rank, cfg.student_lora_alpha, cfg.lora_targets, seed, name="student")
    if critic == "lora":
        add_lora(net, critic_rank, cfg.critic_lora_alpha, cfg.lora_targets, seed + 1, name="critic")
    return teacher, student, critic_denoiser


def _image_models(cfg: ModelConfig, pipe: Any, net: Any, student_net: Any, needs: Needs, student_cfg: float | None,
                  critic: str | None, critic_rank: int, seed: int, family: str, text: Any) -> Models:
    process = NoiseProcess.from_scheduler(pipe.scheduler)
    if needs.student_sampler == "flowmap":  # a flow-map student reads where its step ends
        if student_net is None:
            raise ConfigError("a flow-map student (meanflow) needs a full-weight student: its second time embedding "
                              "is new weights outside the teacher's network; set model.student_lora_rank to null")
        with torch.random.fork_rng():  # the new embedding's first layer is seeded, the global generator untouched
            torch.manual_seed(seed + 7)
            student_net = with_end_time(student_net)
    if cfg.student_time_max_freq is not None:  # full-weight student (config checks)
        lowpass_time_input(student_net, cfg.student_time_max_freq)
    teacher, student, critic_denoiser = _network_roles(net, student_net, process, cfg, critic, critic_rank, seed)
    side = image_size(pipe, cfg.resolution) // vae_factor(pipe)
    if family in FLOW_BUILDERS.values() and side % 2:
        raise ConfigError(f"model.resolution {image_size(pipe, cfg.resolution)} gives an odd latent size {side}; "
                          f"the transformer's 2x2 patches need a multiple of {2 * vae_factor(pipe)}")
    return Models(
        process=process,
        teacher=teacher,
        student=Student(student, cfg.timesteps, needs.student_sampler, student_cfg),
        critic=critic_denoiser,
        family=family,
        sample_shape=(latent_channels(pipe.vae), side, side),
        text=text,
        vae=pipe.vae,
        pipeline=pipe,
        seed=seed,
    )


def _unet_models(cfg: ModelConfig, pipe: Any, needs: Needs, student_cfg: float | None, critic: str | None,
                 critic_rank: int, seed: int) -> Models:
    """SD 1.x / 2.x / SDXL: the pipeline's UNet is the teacher (`_network_roles`)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise ConfigError(f"teacher pipeline {type(pipe).__name__!r} has no UNet2DConditionModel as its unet")
    text = text_conditioner(pipe, cfg.resolution)
    student_net = None if cfg.student_lora_rank is not None else _student_unet(pipe.unet, cfg.cfg_embedding_dim)
    return _image_models(cfg, pipe, pipe.unet, student_net, needs, student_cfg, critic, critic_rank, seed,
                         "sdxl" if text.sdxl else "sd", text)


def _transformer_models(cfg: ModelConfig, pipe: Any, needs: Needs, student_cfg: float | None, critic: str | None,
                        critic_rank: int, seed: int) -> Models:
    """SD3 / SD3.5 and Flux.1: the pipeline's flow-matching transformer is the teacher (`distill_diffusion.flow_nets`
    calls it); its roles are built exactly as a UNet's (`_network_roles`)."""
    if cfg.cfg_embedding_dim is not None:
        raise ConfigError("model.cfg_embedding_dim (a student that reads its CFG scale) is for UNet teachers; a "
                          "flow-transformer student bakes its guidance in: set it to null")
    text = text_conditioner(pipe, cfg.resolution, cfg.embedded_guidance)
    student_net = None if cfg.student_lora_rank is not None else copy.deepcopy(pipe.transformer)
    return _image_models(cfg, pipe, pipe.transformer, student_net, needs, student_cfg, critic, critic_rank, seed,
                         FLOW_BUILDERS[type(pipe).__name__], text)


# the flow-matching transformer pipelines -> their family name
FLOW_BUILDERS = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "SanaPipeline": "sana",
                 "QwenImagePipeline": "qwen"}
# a teacher pipeline's class -> the builder of its roles (a new teacher family adds its builder here)
BUILDERS = {"StableDiffusionPipeline": _unet_models, "StableDiffusionXLPipeline": _unet_models,
            **{name: _transformer_models for name in FLOW_BUILDERS}}


def _student_unet(unet: Any, cfg_dim: int | None) -> Any:
    """A full-weight copy of the teacher's UNet; with ``cfg_dim``, one that also reads a CFG-scale embedding
    (`with_cfg_embedding`: LCM's ``time_cond_proj_dim``, starting at zero so the student starts as the teacher;
    LCM's script initialises it at random)."""
    if cfg_dim is None or unet.config.time_cond_proj_dim == cfg_dim:
        return copy.deepcopy(unet)
    if unet.config.time_cond_proj_dim is not None:
        raise ConfigError(f"the teacher's UNet already reads a CFG-scale embedding of width "
                          f"{unet.config.time_cond_proj_dim}; set model.cfg_embedding_dim to that or null")
    return with_cfg_embedding(unet, cfg_dim).to(unet.device, unet.dtype)


def with_cfg_embedding(unet: Any, dim: int) -> Any:
    """A new plain ``UNet2DConditionModel`` holding ``unet``'s weights plus a CFG-scale embedding of width ``dim``
    (diffusers' ``time_cond_proj_dim``) whose projection is exactly zero, so it computes what ``unet`` computes. The
    student that reads its CFG scale starts from it; exports of students without one get it
    (`pipelines.export.export_unet`)."""
    plain = unet_with_config(unet, time_cond_proj_dim=dim)
    missing, unexpected = plain.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"UNet does not fit a CFG-scale embedding: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        plain.time_embedding.cond_proj.weight.zero_()
    return plain
