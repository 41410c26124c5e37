"""Export parity: a separate Python process that never imports distill_diffusion loads the export with plain
diffusers and reproduces `distill-diffusion sample RUN_DIR` image for image (max abs difference <= 1e-4 in fp32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config

from distill_diffusion.errors import ConfigError
from distill_diffusion.pipelines.export import export
from distill_diffusion.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a handwritten digit seven", "a photo of a cat", "a handwritten digit two"]
SEEDS = [11, 12, 13]

# Runs in a fresh interpreter: plain diffusers only. Prints the call it made and saves the float images.
PLAIN_DIFFUSERS = r"""
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
torch.set_num_threads(1)
out, prompts, seeds, mode = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
gens = [torch.Generator().manual_seed(s) for s in seeds]
if mode == "lora":
    import diffusers
    teacher_dir, lora_dir = sys.argv[5], sys.argv[6]
    info = json.load(open(lora_dir + "/export.json"))
    cls, sched = getattr(diffusers, info["pipeline_class"]), getattr(diffusers, info["scheduler_class"])
    pipe = cls.from_pretrained(teacher_dir, scheduler=sched.from_pretrained(lora_dir, subfolder="scheduler"))
    pipe.load_lora_weights(lora_dir)
else:
    export_dir = sys.argv[5]
    pipe = DiffusionPipeline.from_pretrained(export_dir)
    info = json.load(open(export_dir + "/export.json"))
    if info.get("end_time_hook"):  # a flow-map student: the model card's loading step, run as the card prints it
        card = open(export_dir + "/README.md").read()
        code = card.split("```python")[1].split("```")[0]
        exec(code.split("pipe = DiffusionPipeline")[0])
        if info["end_time_hook"] == "class_labels":
            add_end_time_hook(pipe)
        else:
            add_end_time_embedding(pipe, export_dir)
call = dict(info["call"], **(json.loads(sys.argv[6]) if mode == "full" and len(sys.argv) > 6 else {}))
pipe.set_progress_bar_config(disable=True)
if info.get("seed_global_rng"):  # the model card's call: one image per call, torch's global generator seeded
    images = []
    for p, s in zip(prompts, seeds):
        torch.manual_seed(s)
        images.append(pipe(p, generator=torch.Generator().manual_seed(s), output_type="np", **call).images)
    images = np.concatenate(images)
else:
    images = pipe(prompts, generator=gens, output_type="np", **call).images
np.save(out, images)
assert not any(m.startswith("distill_diffusion") for m in sys.modules), "imported distill_diffusion"
print(json.dumps({"class": type(pipe).__name__, "call": call, "scheduler": type(pipe.scheduler).__name__}))
"""


def plain_diffusers(tmp_path: Path, mode: str, *paths: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / f"plain_{mode}.npy"
    cmd = [sys.executable, "-c", PLAIN_DIFFUSERS, str(out), json.dumps(PROMPTS), json.dumps(SEEDS), mode, *paths]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                       "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out), json.loads(r.stdout.strip().splitlines()[-1])


METHOD_ARGS = {"dmd2": {"critic_updates": 1, "lr_student": 1e-3, "teacher_cfg": 1.5},
               "consistency": {"lr_student": 1e-3, "teacher_cfg": 1.5, "grid_steps": 4},
               "progressive": {"lr_student": 1e-3, "teacher_cfg": 1.5, "steps_per_round": 4},
               "scm": {"lr_student": 1e-3, "teacher_cfg": 1.5, "tangent_warmup": 0},
               "rcm": {"lr_student": 1e-3, "teacher_cfg": 1.5, "tangent_warmup": 0, "critic_updates": 1},
               "meanflow": {"lr_student": 1e-3, "teacher_cfg": 1.5, "flow_matching_ratio": 0.0}}


def distill(run: Path, teacher: str, timesteps: list[int], lora_rank: int | None = None, method: str = "dmd2",
            method_args: dict | None = None, model_args: dict | None = None) -> Path:
    """A few real updates (DMD2 unless told), so the student differs from its teacher."""
    cfg = make_config(method, teacher, args={**METHOD_ARGS.get(method, {}), **(method_args or {})},
                      model={"timesteps": timesteps, "student_lora_rank": lora_rank, **(model_args or {})},
                      data={"real": "digits"} if method != "dmd2" else {},
                      train={"steps": 4, "batch_size": 2, "checkpoint_every": 100})
    Trainer(cfg, run).train()
    return run


def student_images(run: Path) -> np.ndarray:
    from distill_diffusion.eval.generate import generate, load_model

    images, _ = generate(load_model(str(run)), PROMPTS, SEEDS, progress=False, as_float=True)
    return images


def cli_sample_pngs(run: Path, out: Path) -> np.ndarray:
    """`distill-diffusion sample RUN --prompt P --seed S`, one call per (prompt, seed) pair, read back as PNGs."""
    from PIL import Image

    pngs = []
    for i, (p, s) in enumerate(zip(PROMPTS, SEEDS)):
        target = out / str(i)
        cmd = [sys.executable, "-m", "distill_diffusion.cli", "sample", str(run), "--out", str(target), "--prompt", p,
               "--seed", str(s)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        pngs.append(np.asarray(Image.open(target / "00000.png")))
    return np.stack(pngs)


@pytest.mark.parametrize("kind, timesteps, bare", [
    ("sd15", [999, 749, 499, 249], True),     # 4-step SD: bare pipe(prompt)
    ("sd21", [999], False),                    # v-prediction, 1 step: num_inference_steps=1
    ("sdxl", [999, 499], False),               # SDXL: num_inference_steps=2 (CFG off by the zero w-embedding)
    ("digits", [999, 749, 499, 249], True),    # the embedded teacher
])
def test_export_matches_student_in_plain_diffusers(tmp_path: Path, tiny_dirs: dict[str, str], kind: str,
                                                   timesteps: list[int], bare: bool) -> None:
    run = distill(tmp_path / "run", "embedded:digits" if kind == "digits" else tiny_dirs[kind], timesteps)
    out = export(run, tmp_path / "export")
    info = json.loads((out / "export.json").read_text())
    assert info["timesteps"] == timesteps
    assert (info["call"] == {}) == bare
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    card = (out / "README.md").read_text()
    assert "```python" in card
    # a 1-step student's card says why its call names the step count (measured: bench/one_step_call.py)
    assert ("scores FID 72.3 against 7.2 in one step" in card) == (len(timesteps) == 1)

    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(out))
    assert meta["scheduler"] == "LCMScheduler"
    assert meta["class"] == ("StableDiffusionXLPipeline" if kind == "sdxl" else "LatentConsistencyModelPipeline")
    assert np.abs(mine - theirs).max() <= 1e-4
    # the student really took optimizer steps away from its teacher (otherwise parity would prove little)
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert max(r.get("student", 0) for r in logs) >= 2


@pytest.mark.slow  # 1 min; the float parity tests above pin the same path
def test_cli_sample_pngs_match_the_export(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999, 749, 499, 249])
    out = export(run, tmp_path / "export")
    pngs = cli_sample_pngs(run, tmp_path / "samples")
    theirs, _ = plain_diffusers(tmp_path, "full", str(out))
    theirs_u8 = (np.clip(theirs, 0, 1) * 255).round().astype(np.int16)
    assert np.abs(pngs.astype(np.int16) - theirs_u8).max() <= 1  # a float difference may flip one rounding


def test_lora_student_exports_merged_and_as_lora(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999, 749, 499, 249], lora_rank=4)
    full = export(run, tmp_path / "export")
    lora = export(run, tmp_path / "export_lora", lora=True)
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and not (lora / "unet").exists()
    mine = student_images(run)
    merged, _ = plain_diffusers(tmp_path, "full", str(full))
    applied, meta = plain_diffusers(tmp_path, "lora", tiny_dirs["sd15"], str(lora))
    assert meta["call"] == {"num_inference_steps": 4, "guidance_scale": 0.0}  # the teacher pipeline class
    assert meta["class"] == "StableDiffusionPipeline"
    assert np.abs(mine - merged).max() <= 1e-4
    assert np.abs(mine - applied).max() <= 1e-4


@pytest.mark.parametrize("method, lora, max_freq", [("scm", 4, None), ("rcm", None, 0.12)])
def test_continuous_time_student_exports_like_a_consistency_student(tmp_path: Path, tiny_dirs: dict[str, str],
                                                                    method: str, lora: int | None,
                                                                    max_freq: float | None) -> None:
    """An sCM / rCM student of a VP teacher samples as consistency students do (x0, re-noise on the teacher's grid):
    a stock LCMScheduler export (merged and as LoRA weights) reproduces it in plain diffusers; its learned
    log-variance w(t) is a training device and stays out of the export. A student with a low-passed time input
    (`model.student_time_max_freq`) exports as a stock UNet whose switched-off columns are zero."""
    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999, 499], lora_rank=lora, method=method,
                  model_args={"student_time_max_freq": max_freq})
    full = export(run, tmp_path / "export")
    if max_freq is not None:
        from diffusers import UNet2DConditionModel

        from distill_diffusion.time_lowpass import frequencies

        unet = UNet2DConditionModel.from_pretrained(full / "unet")
        off = frequencies(unet.time_proj) > max_freq
        assert off.any() and unet.time_embedding.linear_1.weight[:, off].abs().max() == 0
        assert unet.time_embedding.linear_1.weight[:, ~off].abs().min() > 0
    mine = student_images(run)
    merged, meta = plain_diffusers(tmp_path, "full", str(full))
    assert meta["scheduler"] == "LCMScheduler"
    assert np.abs(mine - merged).max() <= 1e-4
    assert not any("scm_logvar" in str(f) for f in full.rglob("*"))
    if lora:
        adapter = export(run, tmp_path / "export_lora", lora=True)
        applied, _ = plain_diffusers(tmp_path, "lora", tiny_dirs["sd15"], str(adapter))
        assert np.abs(mine - applied).max() <= 1e-4
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert max(r.get("student", 0) for r in logs) >= 2 and max(r.get("g_norm", 0) for r in logs) > 0


def test_progressive_student_exports_with_ddim(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    """A DDIM-sampling student (progressive distillation) exports in the teacher's own pipeline class with a stock
    trailing DDIMScheduler, and plain diffusers reproduces it."""
    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999, 499], method="progressive")
    out = export(run, tmp_path / "export")
    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(out))
    assert (meta["class"], meta["scheduler"]) == ("StableDiffusionPipeline", "DDIMScheduler")
    assert meta["call"] == {"num_inference_steps": 2}
    assert np.abs(mine - theirs).max() <= 1e-4


def test_lcm_lora_digits_student_exports_as_lora_weights(tmp_path: Path) -> None:
    """LCM-LoRA: a consistency-distilled LoRA student of the embedded digits teacher, exported as LoRA weights that
    plain diffusers loads onto the teacher's own pipeline, reproduces the toolkit's samples."""
    from distill_diffusion.zoo import path as zoo_path

    run = distill(tmp_path / "run", "embedded:digits", [999, 749, 499, 249], lora_rank=4, method="consistency")
    lora = export(run, tmp_path / "export_lora", lora=True)
    mine = student_images(run)
    applied, meta = plain_diffusers(tmp_path, "lora", str(zoo_path("digits")), str(lora))
    assert (meta["class"], meta["scheduler"]) == ("StableDiffusionPipeline", "LCMScheduler")
    assert np.abs(mine - applied).max() <= 1e-4


def test_export_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999])
    # a full-weight student has no LoRA export
    with pytest.raises(ConfigError, match="needs a student trained as a LoRA adapter"):
        export(run, tmp_path / "lora", lora=True)
    assert not (tmp_path / "lora").exists() and not list(tmp_path.glob(".tmp_*"))
    # an existing output directory is not overwritten
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export(run, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    # a run directory with no trained student
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="has no trained student"):
        export(empty, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    # a teacher whose pipeline class no export supports
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    odd = tmp_path / "ddpm_teacher"
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(odd)
    (empty / "config.yaml").write_text((run / "config.yaml").read_text().replace(tiny_dirs["sd15"], str(odd)))
    (empty / "final").mkdir()
    (empty / "final" / "student.safetensors").write_bytes((run / "final" / "student.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="teacher pipeline class 'DDPMPipeline' is not supported"):
        export(empty, tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("method, timesteps, pipeline_class, scheduler", [
    ("consistency", [999, 749, 499, 249], "LatentConsistencyModelPipeline", "LCMScheduler"),
    ("progressive", [999, 499], "StableDiffusionPipeline", "DDIMScheduler"),
])
def test_w_conditioned_student_exports_its_guidance_embedding(tmp_path: Path, tiny_dirs: dict[str, str], method: str,
                                                              timesteps: list[int], pipeline_class: str,
                                                              scheduler: str) -> None:
    """A student that reads its CFG scale (``model.cfg_embedding_dim``, LCM's w-embedding) exports with its trained
    embedding; plain diffusers feeds ``guidance_scale`` through it and reproduces the toolkit's samples."""
    from diffusers import UNet2DConditionModel

    run = distill(tmp_path / "run", tiny_dirs["sd15"], timesteps, method=method,
                  method_args={"teacher_cfg": 1.0, "teacher_cfg_max": 3.0, "student_cfg": 2.5},
                  model_args={"cfg_embedding_dim": 32})
    out = export(run, tmp_path / "export")
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.time_cond_proj_dim == 32 and unet.time_embedding.cond_proj.weight.abs().max() > 0
    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(out))
    assert (meta["class"], meta["scheduler"]) == (pipeline_class, scheduler)
    assert meta["call"]["guidance_scale"] == 2.5
    assert np.abs(mine - theirs).max() <= 1e-4
    # the scale really reaches the network: the same student at w = 1 samples differently, far beyond the parity
    from distill_diffusion.eval.generate import generate, load_model

    model = load_model(str(run))
    model.run.models.student.cfg_scale = 1.0
    at_one, _ = generate(model, PROMPTS, SEEDS, progress=False, as_float=True)
    # measured: export parity 4e-7, the w = 2.5 vs w = 1 gap after these 4 updates 2e-4
    gap, parity = np.abs(mine - at_one).max(), np.abs(mine - theirs).max()
    assert gap > 1e-5 and gap > 50 * parity, (gap, parity)


def test_flow_map_student_exports_with_one_loading_step_at_any_step_count(tmp_path: Path,
                                                                         tiny_dirs: dict[str, str]) -> None:
    """A MeanFlow student of a VP teacher: a stock UNet (diffusers' timestep class embedding) in the teacher's
    pipeline class with a trailing DDIMScheduler; the model card's hook passes each step's interval. Plain diffusers
    with that hook reproduces the student at its trained 2 steps and, from the same export, at 1 step."""
    from distill_diffusion.eval.generate import generate, load_model

    run = distill(tmp_path / "run", tiny_dirs["sd15"], [999, 499], method="meanflow")
    out = export(run, tmp_path / "export")
    info = json.loads((out / "export.json").read_text())
    assert info["end_time_hook"] and info["call"] == {"num_inference_steps": 2}
    assert "def add_end_time_hook(pipe):" in (out / "README.md").read_text()
    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(out))
    assert (meta["class"], meta["scheduler"]) == ("StableDiffusionPipeline", "DDIMScheduler")
    assert np.abs(mine - theirs).max() <= 1e-4
    model = load_model(str(run))
    model.run.models.student.timesteps = [999]
    mine_1, _ = generate(model, PROMPTS, SEEDS, progress=False, as_float=True)
    theirs_1, _ = plain_diffusers(tmp_path, "full", str(out), json.dumps({"num_inference_steps": 1}))
    assert np.abs(mine_1 - theirs_1).max() <= 1e-4
    assert np.abs(mine_1 - mine).max() > 1e-3  # two different samplers of one student, both reproduced
    # the exported sweep loads it the same way (`eval.generate.load_model` registers the card's hook)
    exported, _ = generate(load_model(str(out)), PROMPTS, SEEDS, progress=False, as_float=True)
    assert np.abs(exported - mine).max() <= 1e-4
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["class_embed_type"] == "timestep"


@pytest.mark.parametrize("kind", ["sd3", "flux", pytest.param("qwen", marks=pytest.mark.slow)])
def test_flow_transformer_flow_map_student_exports_with_its_embedding_beside(tmp_path: Path,
                                                                             tiny_dirs: dict[str, str],
                                                                             kind: str) -> None:
    """An SD3 / Flux MeanFlow student: the stock transformer class in the teacher's pipeline with a stock
    FlowMatchEulerDiscreteScheduler on the call's sigmas, its second-time embedding saved beside it and loaded by the
    model card's function; plain diffusers reproduces the student at 2 steps and, from the same export, at 1."""
    from distill_diffusion.eval.generate import generate, load_model

    run = distill(tmp_path / "run", tiny_dirs[kind], [1000, 500], method="meanflow",
                  method_args={"teacher_cfg": 1.0})
    out = export(run, tmp_path / "export")
    info = json.loads((out / "export.json").read_text())
    assert info["end_time_hook"] == "embedding" and (out / "end_time_embed.safetensors").is_file()
    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(out))
    assert meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert np.abs(mine - theirs).max() <= 1e-4
    model = load_model(str(run))
    model.run.models.student.timesteps = [1000]
    mine_1, _ = generate(model, PROMPTS, SEEDS, progress=False, as_float=True)
    theirs_1, _ = plain_diffusers(tmp_path, "full", str(out), json.dumps({"sigmas": [1.0]}))
    assert np.abs(mine_1 - theirs_1).max() <= 1e-4
    exported, _ = generate(load_model(str(out)), PROMPTS, SEEDS, progress=False, as_float=True)
    assert np.abs(exported - mine).max() <= 1e-4
