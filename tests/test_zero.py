"""DeepSpeed ZeRO-1/2 launched with accelerate's DeepSpeed config, on two CPU processes (DeepSpeed's CPU accelerator).

ZeRO-1/2 partition Adam states (and averaged gradients) but keep the weights whole, so a ZeRO run must train exactly
what plain data parallelism trains. The digits DMD2 run with the GAN head (student and critic, each its own engine)
resumes a one-process checkpoint under ZeRO and under DDP; weights and Adam states must then agree, which also shows
that ZeRO reads and writes the one-process checkpoint format.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import launch_error
from test_sharding import CONFIG, OVERRIDES, ROOT, launch_sharded, max_diff

from distill_diffusion.config import load_config
from distill_diffusion.errors import ConfigError
from distill_diffusion.trainer import Trainer
from distill_diffusion.zero import Zero, requested

pytest.importorskip("deepspeed")  # the [deepspeed] extra (part of [dev], so CI runs this file)


def optimizer_diff(a: Path, b: Path) -> float:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["state"].keys() == sb["state"].keys() and sa["param_groups"] == sb["param_groups"]
    return max((sa["state"][i][k].float() - sb["state"][i][k].float()).abs().max().item()
               for i in sa["state"] for k in sa["state"][i])


@pytest.mark.slow  # 2.5 min; run the slow tier after touching sharding
def test_zero_trains_what_ddp_trains_from_and_to_the_one_process_format(tmp_path: Path) -> None:
    start = tmp_path / "start"
    Trainer(load_config(CONFIG, [*OVERRIDES, "train.steps=3"]), start).train()
    zero1_config = tmp_path / "zero1.yaml"
    zero1_config.write_text((ROOT / "configs/accelerate/deepspeed_zero2.yaml").read_text()
                            .replace("zero_stage: 2", "zero_stage: 1"))
    runs = {}
    for name, config in [("ddp", "configs/accelerate/ddp.yaml"), ("zero2", "configs/accelerate/deepspeed_zero2.yaml"),
                         ("zero1", str(zero1_config))]:
        runs[name] = tmp_path / name
        shutil.copytree(start, runs[name])
        r = launch_sharded(runs[name], config, "train.steps=6", "--resume")
        assert r.returncode == 0, (name, launch_error(r))
    for stage in (1, 2):
        logs = [json.loads(line) for line in (runs[f"zero{stage}"] / "logs.jsonl").read_text().splitlines()]
        record = next(r for r in logs if r.get("started_from"))  # the resumed launch's first record
        assert (record.get("started_from"), record.get("zero_stage"), record.get("zero_roles")) == \
            ("step_00000003", stage, ["student", "critic"]), record

    ckpt = Path("checkpoints") / "step_00000006"
    before = load_file(str(start / "final/student.safetensors"))
    assert max_diff(before, load_file(str(runs["ddp"] / ckpt / "model.safetensors"))) > 1e-5  # three steps moved it
    for stage in ("zero1", "zero2"):
        # measured 0.0: same gradients (averaged the same way), same AdamW arithmetic on the flat partitions
        for name in ("model.safetensors", "model_1.safetensors", "final/student_ema.safetensors"):
            path = ckpt / name if name.startswith("model") else Path(name)
            d = max_diff(load_file(str(runs["ddp"] / path)), load_file(str(runs[stage] / path)))
            assert d <= 1e-6, (stage, name, d)
        for name in ("optimizer.bin", "optimizer_1.bin"):  # whole Adam states, as AdamW holds them in one process
            assert optimizer_diff(runs["ddp"] / ckpt / name, runs[stage] / ckpt / name) <= 1e-6, (stage, name)


def clear_deepspeed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_")):
            monkeypatch.delenv(key)


def test_the_launch_config_is_read_and_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_deepspeed_environment(monkeypatch)
    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
                       "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none"}.items():
        monkeypatch.setenv(key, value)
    zero = requested()
    assert isinstance(zero, Zero) and zero.stage == 2 and zero.zero_optimization["stage"] == 2
    assert not any(k.startswith("ACCELERATE_DEEPSPEED") or k == "ACCELERATE_USE_DEEPSPEED" for k in os.environ)
    assert requested() is None  # accelerate now sees a plain launch


@pytest.mark.parametrize(("environ", "words"), [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["ZeRO stage 3 is not supported", "fsdp.yaml"]),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, ["offload_optimizer to cpu is not supported"]),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, ["gradient_accumulation_steps 4 is not supported"]),
])
def test_unsupported_deepspeed_configs_are_refused_in_one_line(environ: dict, words: list[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clear_deepspeed_environment(monkeypatch)
    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", **environ}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as e:
        requested()
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize(("override", "words"), [
    ("train.mixed_precision=fp16", ["fp16 is not supported under DeepSpeed", "bf16"]),
    ("train.optimizer=adamw8bit", ["adamw8bit cannot be partitioned by DeepSpeed", "ddp.yaml"]),
])
def test_what_zero_cannot_run_is_refused_before_writing(override: str, words: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    clear_deepspeed_environment(monkeypatch)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = load_config(CONFIG, ["train.steps=2", "train.batch_size=2", override])
    with pytest.raises(ConfigError) as e:
        Trainer(cfg, tmp_path / "run")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "run").exists()
