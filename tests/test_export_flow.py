"""Export parity for the flow-matching transformer teachers (tiny SD3, Flux.1, SANA and Qwen-Image): every method
distils a few steps, its student exports as the teacher's own pipeline class (full weights, and as LoRA weights for a
LoRA student), and a separate Python process that never imports distill_diffusion reproduces `generate` image for
image (<= 1e-4, fp32).

The default tier runs a re-noising LoRA student (DMD2 on Flux), a deterministic full one (progressive on SD3), a
full DMD2 student of SANA and a LoRA consistency student of Qwen-Image; the other cells, whose students export through
the same two samplers and pipeline classes, are in the slow tier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_export import distill, plain_diffusers, student_images

from distill_diffusion.methods import METHODS
from distill_diffusion.pipelines.export import export

FAMILY = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline",
          "qwen": "QwenImagePipeline"}
ARGS = {"lr_student": 1e-3, "lr_critic": 1e-3, "critic_updates": 1}  # the critic methods: a student step in 4
DEFAULT_TIER = {("flux", "dmd2", True), ("sd3", "progressive", False), ("sana", "dmd2", False),
                ("qwen", "consistency", True), ("sd3", "scm", True)}
OWN_ARGS = {"dmd2": {"lr_student": 1e-3}, "consistency": {"lr_student": 1e-3}, "progressive": {"lr_student": 1e-3},
            "scm": {"lr_student": 1e-3, "tangent_warmup": 0}, "rcm": {**ARGS, "tangent_warmup": 0},
            "meanflow": {"lr_student": 1e-3, "flow_matching_ratio": 0.0}}


def cases() -> list:
    out = []
    for kind in FAMILY:
        for method in sorted(METHODS):
            for lora in (False, True):
                if method == "meanflow" and (lora or kind == "sana"):  # refused in one line (test_meanflow.py,
                    continue  # test_contract.py); its exports: test_export.py's flow-map tests
                marks = () if (kind, method, lora) in DEFAULT_TIER else (pytest.mark.slow,)
                name = f"{kind}-{method}-{'lora' if lora else 'full'}"
                out.append(pytest.param(kind, method, lora, marks=marks, id=name))
    return out


@pytest.mark.parametrize("kind, method, lora", cases())
def test_flow_export_matches_student_in_plain_diffusers(tmp_path: Path, tiny_dirs: dict[str, str], kind: str,
                                                        method: str, lora: bool) -> None:
    # deterministic samplers: DDIM (progressive) and a flow map's moves (MeanFlow)
    ddim = METHODS[method].needs(METHODS[method].config_class()).student_sampler in ("ddim", "flowmap")
    timesteps = [1000.0, 500.0] if ddim else [1000.0, 750.0, 500.0, 250.0]
    teacher = tiny_dirs[kind]
    run = distill(tmp_path / "run", teacher, timesteps, lora_rank=4 if lora else None, method=method,
                  method_args=OWN_ARGS.get(method, ARGS))
    full = export(run, tmp_path / "export")
    info = json.loads((full / "export.json").read_text())
    assert info["timesteps"] == timesteps and info["pipeline_class"] == FAMILY[kind]
    assert info["call"]["sigmas"] == [t / 1000 for t in timesteps]
    # SD3 / Flux pipelines re-noise from torch's global generator; SANA's hands the user's generators to the scheduler
    assert info["seed_global_rng"] == (not ddim and kind != "sana")
    assert not list(full.rglob("*.bin")) and (full / "transformer").is_dir()
    card = (full / "README.md").read_text()
    assert "```python" in card and "sigmas=" in card

    mine = student_images(run)
    theirs, meta = plain_diffusers(tmp_path, "full", str(full))
    assert meta["class"] == FAMILY[kind]
    assert meta["scheduler"] == ("FlowMatchEulerDiscreteScheduler" if ddim else "FlowMatchLCMScheduler")
    assert np.abs(mine - theirs).max() <= 1e-4
    if lora:
        adapter = export(run, tmp_path / "export_lora", lora=True)
        assert (adapter / "pytorch_lora_weights.safetensors").is_file() and not (adapter / "transformer").exists()
        applied, meta = plain_diffusers(tmp_path, "lora", teacher, str(adapter))
        assert meta["class"] == FAMILY[kind]
        assert np.abs(mine - applied).max() <= 1e-4
    # the student really moved away from its teacher, so parity is not the teacher's own weights agreeing
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert max(r.get("student", 0) for r in logs) >= 1


@pytest.mark.parametrize("kind", sorted(FAMILY))
def test_adapter_reproduces_the_pipelines_own_sampling(tiny_dirs: dict[str, str], kind: str) -> None:
    """The teacher through `Denoiser` (timestep units, Flux's packing and ids, its guidance embedding, the prompt
    encoding) walks the pipeline's own Euler schedule (with its shift) to the pipeline's own latents, and the teacher
    sweep's sampler (`generate`) gives the pipeline's images."""
    import torch
    from conftest import make_config

    from distill_diffusion.eval.generate import EvalModel, generate
    from distill_diffusion.factory import build_models
    from distill_diffusion.flow_nets import pack
    from distill_diffusion.latents import decode
    from distill_diffusion.roles import Needs
    from distill_diffusion.sampling import ddim
    from distill_diffusion.teachers import load_pipeline

    pipe = load_pipeline(tiny_dirs[kind])
    pipe.set_progress_bar_config(disable=True)
    models = build_models(make_config("dmd2", tiny_dirs[kind]).model, Needs(), pipeline=pipe)
    prompts, seeds = ["a handwritten digit seven", "a photo of a cat"], [3, 4]
    noise = torch.cat([torch.randn((1, *models.sample_shape), generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    if kind == "sana":  # its own DPM-Solver is not a DDIM walk: compare on the flow Euler scheduler with its shift
        from distill_diffusion.eval.generate import make_scheduler

        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    if kind in ("flux", "qwen"):  # their pipelines' own schedule: sigmas 1 .. 1/N, shifted by mu of the token count
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = pipe.scheduler.config
        mu = calculate_shift(16, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    else:
        pipe.scheduler.set_timesteps(4)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    cond = models.text.encode(prompts)
    with torch.no_grad():
        mine = ddim(lambda x, t: models.teacher.x0(x, t, cond), noise, timesteps, models.process)
    latents = pack(noise) if kind in ("flux", "qwen") else noise
    extra = {"flux": {"height": 16, "width": 16, "guidance_scale": 3.5},
             "sana": {"height": 32, "width": 32, "use_resolution_binning": False, "guidance_scale": 1.0},
             "qwen": {"height": 16, "width": 16, "true_cfg_scale": 1.0}}.get(kind, {"guidance_scale": 1.0})
    theirs = pipe(prompts, latents=latents, output_type="latent", num_inference_steps=4, **extra).images
    if kind in ("flux", "qwen"):
        from distill_diffusion.flow_nets import unpack

        theirs = unpack(theirs, 8, 8)
    assert (mine - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max().item())
    images, _ = generate(EvalModel("teacher", pipeline=pipe), prompts, seeds, steps=4, cfg_scale=3.5 if kind == "flux"
                         else 1.0, solver="euler", progress=False, as_float=True)
    # the sweep's Euler is the pipeline's own schedule: the same images as the walk above
    assert np.abs(images - decode(models, mine, as_float=True)).max() <= 1e-4
    for solver in ("ddim", "dpmpp"):
        if pipe.scheduler.config.get("use_dynamic_shifting") and solver == "dpmpp":  # refused: Flux, Qwen-Image
            continue
        other, _ = generate(EvalModel("teacher", pipeline=pipe), prompts, seeds, steps=4, solver=solver,
                            progress=False, as_float=True)
        assert np.isfinite(other).all() and other.shape == images.shape


@pytest.mark.slow
def test_a_flux_schnell_like_teacher_without_guidance_embedding(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    """FLUX.1-schnell's transformer has no guidance embedding: conditioning carries no guidance, the export's call
    names none, and plain diffusers still reproduces the student."""
    import torch
    from diffusers import FluxTransformer2DModel

    from distill_diffusion.teachers import load_pipeline

    pipe = load_pipeline(tiny_dirs["flux"])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe.transformer = FluxTransformer2DModel.from_config(dict(pipe.transformer.config, guidance_embeds=False))
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(tmp_path / "schnell")
    run = distill(tmp_path / "run", str(tmp_path / "schnell"), [1000.0, 500.0])
    out = export(run, tmp_path / "export")
    info = json.loads((out / "export.json").read_text())
    assert "guidance_scale" not in info["call"]
    theirs, _ = plain_diffusers(tmp_path, "full", str(out))
    assert np.abs(student_images(run) - theirs).max() <= 1e-4
