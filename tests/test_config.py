"""Config: YAML loading, round trips for every method, key=value overrides and one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from distill_diffusion.config import Config, apply_overrides, load_config, parse_config
from distill_diffusion.errors import ConfigError
from distill_diffusion.methods import METHODS, DMD2Config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gmm_dmd2.yaml"


def _round_trip(cfg: Config) -> Config:
    return parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))


def _error(fn: Callable[..., object], *args: object) -> str:
    """The message of the ConfigError that fn(*args) raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_example_config_loads() -> None:
    cfg = load_config(CONFIG)
    assert cfg.method == "dmd2"
    assert isinstance(cfg.method_args, DMD2Config)
    assert cfg.method_args.teacher_cfg == 1.0 and cfg.method_args.critic_updates == 5
    assert cfg.method_args.lr_student == cfg.method_args.lr_critic == 1e-3
    assert cfg.model.teacher == "gmm" and cfg.model.timesteps == [999]
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every) == (6000, 256, 3000)
    # keys the file leaves out keep their defaults
    assert cfg.train.mixed_precision == "no" and cfg.method_args.t_min == 0.02


def test_example_config_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    assert _round_trip(cfg) == cfg
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert isinstance(_round_trip(cfg).method_args.adam_betas, tuple)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips(method: str) -> None:
    cfg = parse_config({"method": method})
    assert isinstance(cfg.method_args, METHODS[method].config_class)
    assert cfg.method_args == METHODS[method].config_class()  # the method's defaults
    assert _round_trip(cfg) == cfg
    data = cfg.to_dict()
    assert set(data) == {"method", method, "model", "data", "train", "eval"}


def test_overrides_apply() -> None:
    cfg = load_config(CONFIG, ["train.steps=7", "model.timesteps=[999,499]", "dmd2.teacher_cfg=2"])
    assert cfg.train.steps == 7
    assert cfg.model.timesteps == [999, 499]
    assert cfg.method_args.teacher_cfg == 2.0 and isinstance(cfg.method_args.teacher_cfg, float)
    assert cfg.train.batch_size == 256  # untouched keys keep the file's values
    # overrides never modify the dict they are given
    raw = {"method": "dmd2", "train": {"steps": 5}}
    assert apply_overrides(raw, ["train.steps=6", "model.teacher=tiny:sd15"])["train"]["steps"] == 6
    assert raw == {"method": "dmd2", "train": {"steps": 5}}


def test_override_errors() -> None:
    assert "integer" in _error(load_config, CONFIG, ["train.steps=abc"])
    message = _error(load_config, CONFIG, ["train.stepz=1"])
    assert "train.stepz" in message and "steps" in message.replace("stepz", "") and "batch_size" in message
    assert "key=value" in _error(load_config, CONFIG, ["train.steps"])
    assert "list" in _error(load_config, CONFIG, ["model.timesteps=999"])


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("dmd2.critic_updates=0", ["critic_updates", ">= 1"]),
        ("dmd2.teacher_cfg=-1", ["teacher_cfg", ">= 0"]),
        ("train.mixed_precision=fp8", ["fp8", "no, fp16, bf16"]),
        ("train.optimizer=lion", ["lion", "adamw, adamw8bit"]),
        ("train.attention=flash", ["flash", "sdpa, xformers"]),
        ("dmd2.critic_target=x0", ["x0", "native"]),
        ("dmd2.lr_student=0", ["lr_student"]),
        ("train.ema_decay=1.0", ["ema_decay"]),
        ("train.progress=maybe", ["true or false"]),
        ("model.cfg_embedding_dim=1", ["cfg_embedding_dim", ">= 2"]),
    ],
)
def test_invalid_values_rejected(override: str, words: list[str]) -> None:
    message = _error(load_config, CONFIG, [override])
    for word in words:
        assert word in message, message


def test_unknown_method_and_sections() -> None:
    message = _error(parse_config, {"method": "dmd3"})
    assert "dmd3" in message and "dmd2" in message
    assert "dmd2" in _error(parse_config, {})
    assert "trian" in _error(parse_config, {"method": "dmd2", "trian": {"steps": 1}})
    # another method's section is not allowed either
    assert "valid top-level keys" in _error(parse_config, {"method": "dmd2", "consistency": {}})
    message = _error(parse_config, {"method": "dmd2", "dmd2": {"teacher_cgf": 2}})
    assert "dmd2.teacher_cgf" in message and "teacher_cfg" in message.replace("teacher_cgf", "")
    assert "mapping" in _error(parse_config, {"method": "dmd2", "train": [1, 2]})


@pytest.mark.parametrize(("section", "old", "new"), [
    ("dmd2", "guidance", "teacher_cfg"), ("sid", "critic_guidance", "critic_cfg"),
    ("sid", "critic_train_guidance", "critic_train_cfg"), ("sid", "gan_generator_weight", "gan_student_weight"),
    ("consistency", "guidance_max", "teacher_cfg_max"), ("progressive", "sample_guidance", "student_cfg"),
    ("model", "guidance_embedding", "cfg_embedding_dim"), ("eval", "guidance", "teacher_cfg"),
    ("eval", "grid_teacher_guidance", "grid_teacher_cfg"),
])
def test_renamed_keys_name_their_new_name(section: str, old: str, new: str) -> None:
    """Keys renamed so that one word means one thing are refused with the new name, in one line."""
    method = section if section not in ("model", "eval") else "dmd2"
    message = _error(parse_config, {"method": method, section: {old: 1.0}})
    assert f"{section}.{old} was renamed to {section}.{new}" in message, message
    assert "removed" in _error(parse_config, {"method": "dmd2", "model": {"critic": True}})


def test_file_errors(tmp_path: Path) -> None:
    assert "not found" in _error(load_config, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dmd2\ntrain:\n  steps: 5: 6\n")
    message = _error(load_config, bad)
    assert "not valid YAML" in message and "line 3" in message
    bad.write_text("method: dmd2\nmodel:\n  timesteps: [999, 499\ntrain:\n  steps: 5\n")
    assert "not valid YAML at line" in _error(load_config, bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "dmd2" in _error(load_config, empty)  # no method given: the valid ones are listed


@pytest.mark.parametrize(("config", "overrides", "words"), [
    ("gmm_dmd2.yaml", ["model.cfg_embedding_dim=64"],
     ["cfg_embedding_dim", "consistency and meanflow and progressive"]),
    ("gmm_progressive.yaml", ["progressive.teacher_cfg_max=3"], ["teacher_cfg_max", "model.cfg_embedding_dim"]),
])
def test_w_conditioning_where_it_does_not_apply(tmp_path: Path, config: str, overrides: list[str],
                                                words: list[str]) -> None:
    """A w-conditioned student only for methods whose teacher solver is guided; a scale range only for one."""
    from distill_diffusion.trainer import Trainer

    cfg = load_config(CONFIG.parent / config, overrides)
    message = _error(Trainer, cfg, tmp_path / "run")
    assert all(w in message for w in words), message
    assert not (tmp_path / "run").exists()


def test_w_conditioning_needs_a_full_weight_student() -> None:
    message = _error(load_config, CONFIG, ["model.cfg_embedding_dim=64", "model.student_lora_rank=4"])
    assert "full-weight student" in message, message


GPU_FAMILIES = ("sd15_", "sdxl_", "sd35_", "flux_")


def test_every_shipped_config_parses_and_every_method_has_gpu_configs() -> None:
    """The GPU configs (hub ids, run elsewhere) are checked here as far as CPU can: they parse with every key known,
    name a hub id, and exist for each method at SD 1.5, SDXL, SD3.5-Large and FLUX.1-dev."""
    from distill_diffusion.methods import METHODS
    from distill_diffusion.teachers import HUB_ID

    root = CONFIG.parent
    for path in sorted(root.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.method in METHODS, path
        if path.name.startswith(GPU_FAMILIES):
            assert HUB_ID.fullmatch(cfg.model.teacher), (path, cfg.model.teacher)
            # a method that trains on real images names them (the consistency and progressive configs once did not)
            needs = METHODS[cfg.method].needs(cfg.method_args)
            assert needs.real_images is None or cfg.data.real or cfg.data.real_cache, (path, needs.real_images)
    for method in METHODS:
        for arch in (family.rstrip("_") for family in GPU_FAMILIES):
            assert (root / f"{arch}_{method}.yaml").is_file(), (arch, method)
    ddp = yaml.safe_load((root / "accelerate" / "ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["mixed_precision"] == "no"
