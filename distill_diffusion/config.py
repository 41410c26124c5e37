"""Experiment configuration: typed dataclasses read from one flat YAML file plus ``key=value`` overrides.

YAML only sets values; Python builds the objects. Unknown keys are an error that lists the valid ones. The method's
own knobs live under a section named after the method (``dmd2:``), parsed into that method's config dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .files import write_text_atomic
from .methods import METHODS


@dataclass
class ModelConfig:
    teacher: str = field(default="gmm", metadata={
        "help": "gmm | embedded:digits | embedded:digits-flow | tiny:sd15 | tiny:sd21 | tiny:sdxl | tiny:sd3 | "
                "tiny:flux | tiny:sana | tiny:qwen | a diffusers directory | a hub id"})
    timesteps: list[int] = field(default_factory=lambda: [999], metadata={"help": "student sampling timesteps"})
    # the Gaussian-mixture known answer
    gmm_classes: int = 8
    gmm_radius: float = 4.0
    gmm_std: float = 0.3
    gmm_dim: int = 2
    gmm_weights: list[float] | None = field(default=None, metadata={
        "help": "class weights of the mixture (normalised; null = equal)"})
    gmm_unconditional: bool = field(default=False, metadata={
        "help": "train and evaluate without the class (the null class): the student must find every mode itself"})
    gmm_process: str = field(default="vp", metadata={
        "help": "the mixture teacher's noise path: vp (SD 1.5's schedule) | flow ((1 - s) x0 + s eps, SD3 / Flux)"})
    mlp_hidden: int = 128
    mlp_layers: int = 3
    mlp_smooth: bool = field(default=False, metadata={
        "help": "mixture nets smooth in t: correction times sigma(t), noise-angle features (continuous-time methods)"})
    # image teachers
    resolution: int | None = field(default=None, metadata={
        "help": "image size the student is trained and exported at; null = the teacher's own (Flux: 1024)"})
    embedded_guidance: float = field(default=3.5, metadata={
        "help": "Flux.1-dev's guidance-embedding value for teacher and student (FluxPipeline's guidance_scale)"})
    # a LoRA student: an adapter on a frozen copy of the teacher's UNet (exports merged, or as LoRA weights)
    student_lora_rank: int | None = field(default=None, metadata={"help": "LoRA rank; null = full-weight student"})
    student_lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    # a LoRA critic: an adapter on the teacher's own UNet, so teacher and critic share one set of base weights
    critic_lora_rank: int | None = field(
        default=None, metadata={"help": "LoRA critic rank; 0 = full-weight critic; null = the method's default"})
    critic_lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)"})
    # a student that reads its CFG scale (consistency, progressive), through an embedding like LCM's
    # time_cond_proj_dim
    cfg_embedding_dim: int | None = field(
        default=None, metadata={"help": "width of the student's CFG-scale embedding (LCM: 256); null = baked in"})
    # a student whose sinusoidal time features stop at this frequency (continuous-time methods: time_lowpass.py)
    student_time_max_freq: float | None = field(default=None, metadata={
        "help": "switch off the student's timestep features above this many rad per timestep (the continuous-time "
                "methods' tangent; 0.3 drops a UNet's top three); null = the teacher's own"})

    def __post_init__(self) -> None:
        if self.gmm_process not in ("vp", "flow"):
            raise ConfigError(f"model.gmm_process must be vp or flow, got {self.gmm_process!r}")
        if self.gmm_weights is not None and (len(self.gmm_weights) != self.gmm_classes
                                             or not all(w > 0 for w in self.gmm_weights)):
            raise ConfigError(f"model.gmm_weights must be {self.gmm_classes} positive numbers (model.gmm_classes), "
                              f"got {self.gmm_weights}")
        if self.cfg_embedding_dim is not None and self.cfg_embedding_dim < 2:
            raise ConfigError(f"model.cfg_embedding_dim must be >= 2 (LCM uses 256) or null, got "
                              f"{self.cfg_embedding_dim}")
        if self.cfg_embedding_dim is not None and self.student_lora_rank is not None:
            raise ConfigError("model.cfg_embedding_dim needs a full-weight student (its embedding is new weights in "
                              "the UNet); a LoRA student bakes one CFG scale in: drop one of the two")
        if self.student_time_max_freq is not None and (self.student_time_max_freq <= 0
                                                       or self.student_lora_rank is not None):
            raise ConfigError(f"model.student_time_max_freq needs a full-weight student (model.student_lora_rank "
                              f"null) and a value > 0 rad per timestep, got {self.student_time_max_freq} with "
                              f"student_lora_rank {self.student_lora_rank}")
        if self.student_time_max_freq is not None and self.teacher == "gmm":
            raise ConfigError("model.student_time_max_freq low-passes a diffusers network's sinusoidal time input; "
                              "the mixture MLP's smooth time features are model.mlp_smooth")
        if self.student_lora_rank is not None and self.student_lora_rank < 1:
            raise ConfigError(f"model.student_lora_rank must be >= 1 (or null for a full-weight student), "
                              f"got {self.student_lora_rank}")
        if self.critic_lora_rank is not None and self.critic_lora_rank < 0:
            raise ConfigError(f"model.critic_lora_rank must be >= 1 (LoRA critic), 0 (full-weight critic) or null "
                              f"(the method's default), got {self.critic_lora_rank}")
        for name in ("student_lora_alpha", "critic_lora_alpha"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if not self.lora_targets:
            raise ConfigError("model.lora_targets must name at least one module, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.resolution is not None and (self.resolution < 16 or self.resolution % 16):
            raise ConfigError(f"model.resolution must be a multiple of 16 (e.g. 512, 1024) or null (the teacher's "
                              f"own), got {self.resolution}")
        if self.embedded_guidance < 0:
            raise ConfigError(f"model.embedded_guidance must be >= 0 (Flux.1-dev uses 3.5), got "
                              f"{self.embedded_guidance}")


@dataclass
class DataConfig:
    prompts: list[str] = field(
        default_factory=lambda: [f"a handwritten digit {w}" for w in
                                 ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
    )
    prompt_file: str | None = field(default=None, metadata={
        "help": "prompts of any number, read lazily (replaces `prompts`): .txt (a line each), .jsonl, .csv, .tsv, "
                ".parquet, WebDataset .tar shards, a `datasets` folder, hf:NAME[:SPLIT]"})
    prompt_column: str | None = field(default=None, metadata={
        "help": "column / JSON field of the prompts (default: the first of prompt, caption, text)"})
    prompt_cache: str | None = field(default=None, metadata={
        "help": "prompt embeddings made by `distill-diffusion data encode-prompts` (replaces encoding each batch)"})
    real: str | None = field(default=None, metadata={
        "help": "real images for GAN / data terms: digits | an image folder (recursive) | .tar shards | .parquet | a "
                "`datasets` folder | hf:NAME[:SPLIT]"})
    real_cache: str | None = field(default=None, metadata={
        "help": "image latents made by `distill-diffusion data encode-images` (replaces `real`)"})
    image_column: str | None = field(default=None, metadata={"help": "image column of a table (default: image)"})
    caption_column: str | None = field(default=None, metadata={
        "help": "caption column / JSON field of real images (default: the first of prompt, caption, text)"})
    workers: int = field(default=2, metadata={"help": "DataLoader worker processes for streamed sources (0: none)"})
    prefetch: int = field(default=4, metadata={"help": "batches each worker reads ahead"})

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0 (0: read in the training process), got {self.workers}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if self.real is not None and self.real_cache is not None:
            raise ConfigError("data.real and data.real_cache are both set; the cache replaces the source: keep one")


OPTIMIZERS = ("adamw", "adamw8bit")
ATTENTION = ("sdpa", "xformers")


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps over all roles"})
    max_seconds: float = field(default=0.0, metadata={
        "help": "stop after this many seconds of training (at a step boundary, then write final/); 0 = no limit"})
    batch_size: int = 64
    seed: int = 0
    grad_clip: float = 10.0
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the student; 0 disables"})
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_every: int = field(default=0, metadata={"help": "periodic samples / known-answer metrics; 0 = at end"})
    eval_samples: int = 4000
    half_frozen: bool = field(default=True, metadata={
        "help": "under fp16/bf16, keep frozen weights (teacher, VAE, text encoders, LoRA roles' shared base) in "
                "that precision; trainable weights stay fp32"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adamw8bit (bitsandbytes)"})
    attention: str = field(default="sdpa", metadata={"help": "sdpa (PyTorch, diffusers' default) | xformers (GPU)"})
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"unknown mixed_precision {self.mixed_precision!r}; choose one of: no, fp16, bf16")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown train.optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"unknown train.attention {self.attention!r}; choose one of: {', '.join(ATTENTION)}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        for name, meaning in (("seed", "a seed"), ("grad_clip", "0: no clipping"), ("sample_every", "0: at the end"),
                              ("max_seconds", "0: no limit")):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 ({meaning}), got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """What `distill-diffusion run` measures after training: the FID-vs-NFE sweep and the sample grids."""

    ref: str = field(default="digits", metadata={"help": "FID reference: digits | image folder | stats .npz"})
    prompt_file: str | None = field(default=None, metadata={"help": "sweep prompts (required unless ref digits)"})
    num_samples: int = 1000
    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50])
    solvers: list[str] = field(default_factory=lambda: ["ddim"])
    teacher_cfg: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "teacher CFG scales swept"})
    features: str = "auto"
    extra_features: list[str] = field(default_factory=list, metadata={
        "help": "further feature spaces: dinov2 | clip | dinov2:NAME_OR_DIR | clip:NAME_OR_DIR (eval/backbones.py)"})
    batch_size: int = 250
    grid_prompts: int = 10
    grid_seeds: int = 4
    grid_teacher_steps: int = 50
    grid_teacher_cfg: float = 1.0

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "grid_prompts", "grid_seeds", "grid_teacher_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if not self.nfe or any(n < 1 for n in self.nfe):
            raise ConfigError(f"eval.nfe must be a non-empty list of positive integers, got {self.nfe}")
        if any(w < 0 for w in [*self.teacher_cfg, self.grid_teacher_cfg]):
            raise ConfigError("eval.teacher_cfg and eval.grid_teacher_cfg must be >= 0 (1 = no guidance)")
        if self.extra_features:  # refused at load, not after the distillation (the module imports torch: here only)
            from .eval.backbones import parse_spec

            kinds = [parse_spec(spec)[0] for spec in self.extra_features]
            if len(set(kinds)) != len(kinds):
                raise ConfigError(f"eval.extra_features names a space twice: {self.extra_features}")


@dataclass
class Config:
    method: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method_args: Any = None  # the method's own dataclass, YAML section named after the method
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            self.method: _plain(dataclasses.asdict(self.method_args)),
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
        }

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ------------------------------------------------------------------------------------------------ parsing
# keys renamed before 1.0 (old -> new, in whichever section has the new key), so one name means one thing; an old key
# is refused with the new one's name
RENAMED = {
    "guidance": "teacher_cfg",  # a method's teacher CFG scale (the low end of its range where it has one)
    "guidance_max": "teacher_cfg_max",
    "sample_guidance": "student_cfg",
    "critic_guidance": "critic_cfg",
    "critic_train_guidance": "critic_train_cfg",
    "gan_generator_weight": "gan_student_weight",
    "guidance_embedding": "cfg_embedding_dim",
    "grid_teacher_guidance": "grid_teacher_cfg",
}
REMOVED = {"model.critic": "the method decides whether it has a critic; model.critic_lora_rank chooses its kind"}


def from_dict(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and values of the wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    for key in unknown:
        if RENAMED.get(key) in names:
            raise ConfigError(f"{where}.{key} was renamed to {where}.{RENAMED[key]}; rename it in the config")
        if f"{where}.{key}" in REMOVED:
            raise ConfigError(f"{where}.{key} was removed: {REMOVED[f'{where}.{key}']}")
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, where) for v in value]
        if origin is tuple:
            if len(args) == 2 and args[1] is not Ellipsis and len(out) != 2:
                raise ConfigError(f"{where} must have 2 entries, got {value!r}")
            return tuple(out)
        return out
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``train.steps=100`` style overrides; values are parsed as YAML (``[999, 499]``, ``true``, ``1e-4``)."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping with at least `method:`")
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.steps=100)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        parts = key.strip().split(".")
        node = raw
        for i, p in enumerate(parts[:-1]):
            if node.get(p) is not None and not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return raw


def parse_config(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config must be a YAML mapping with at least `method:`")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    sections = {"method", "model", "data", "train", "eval", method}
    unknown = sorted(set(raw) - sections)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}; valid top-level keys: {', '.join(sorted(sections))}")
    cfg = Config(
        method=method,
        model=from_dict(ModelConfig, raw.get("model"), "model"),
        data=from_dict(DataConfig, raw.get("data"), "data"),
        train=from_dict(TrainConfig, raw.get("train"), "train"),
        method_args=from_dict(METHODS[method].config_class, raw.get(method), method),
        eval=from_dict(EvalConfig, raw.get("eval"), "eval"),
    )
    if getattr(cfg.method_args, "jvp", None) == "finite_difference" and cfg.train.mixed_precision != "no":
        raise ConfigError(f"{method}.jvp finite_difference subtracts two network calls a step of "
                          f"{cfg.method_args.fd_step:g} x t apart, which half precision cannot resolve "
                          f"(train.mixed_precision {cfg.train.mixed_precision}): use jvp: autograd, or train in fp32")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {str(path)!r} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {str(path)!r} is not valid YAML{where}") from None
    return parse_config(apply_overrides(raw or {}, overrides or []))
