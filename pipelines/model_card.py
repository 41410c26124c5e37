"""The model card of an export: teacher, method, steps, the exact call, the student's sweep table, the config."""

from __future__ import annotations

from typing import Any

import yaml

from distill_diffusion.config import Config

LICENSE_NOTE = (
    "The student is a derivative of its teacher: it is subject to the teacher's license and use restrictions "
    "(for Stable Diffusion 1.x/2.x the CreativeML OpenRAIL-M, for SDXL the CreativeML OpenRAIL++-M, for SD3 / SD3.5 "
    "the Stability AI Community License, for Flux.1-dev the FLUX.1 [dev] Non-Commercial License; the embedded "
    "digits teacher is trained by this toolkit on scikit-learn's digits, BSD-3-Clause). The export carries no "
    "safety checker."
)


def format_call(kwargs: dict[str, Any]) -> str:
    """``prompt, k=v, ...``: the arguments of an export's pipeline call, as Python."""
    return ", ".join(["prompt"] + [f"{k}={v!r}" for k, v in kwargs.items()])


def usage_code(info: dict[str, Any], where: str = "OUT_DIR") -> str:
    """Python that samples the export exactly as the student samples (the model card's and report's snippet)."""
    call = format_call(info["call"])
    if info["lora"]:
        cls, sched = info["pipeline_class"], info.get("scheduler_class", "LCMScheduler")
        return (
            f"from diffusers import {cls}, {sched}\n\n"
            f"scheduler = {sched}.from_pretrained(\"{where}\", subfolder=\"scheduler\")\n"
            f"pipe = {cls}.from_pretrained(\"TEACHER_DIR\", scheduler=scheduler)\n"
            f"pipe.load_lora_weights(\"{where}\")\n"
            f"image = pipe({call}).images[0]\n"
        )
    if info.get("end_time_hook"):
        import inspect
        import re

        from . import end_time

        unet = info["end_time_hook"] == "class_labels"
        fn = end_time.add_end_time_hook if unet else end_time.add_end_time_embedding
        load = ("add_end_time_hook(pipe)  # the UNet reads where each step ends (class_labels)" if unet else
                f"add_end_time_embedding(pipe, \"{where}\")  # the transformer's second time, and each step's end")
        steps = "num_inference_steps" if unet else "sigmas"
        return (
            "from diffusers import DiffusionPipeline\n\n\n"
            + re.sub(r"  # noqa[^\n]*", "", inspect.getsource(fn))
            + f"\n\npipe = DiffusionPipeline.from_pretrained(\"{where}\")\n{load}\n"
            f"image = pipe({call}).images[0]  # any {steps}: one flow map, every step count\n"
        )
    if info.get("seed_global_rng"):
        return (
            "import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{where}\")\n"
            "seed = 0\n"
            "torch.manual_seed(seed)  # the pipeline re-noises between steps from torch's global generator\n"
            f"image = pipe({call}, generator=torch.Generator().manual_seed(seed)).images[0]\n"
        )
    return (
        "from diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained(\"{where}\")\n"
        f"image = pipe({call}).images[0]\n"
    )


def scheduler_note(info: dict[str, Any], steps: int) -> str:
    name = info.get("scheduler_class", "LCMScheduler")
    if name == "LCMScheduler":
        return f"stock `LCMScheduler` with `original_inference_steps={steps}` (x0, then fresh noise, each step)"
    if name == "FlowMatchLCMScheduler":
        return "stock `FlowMatchLCMScheduler` without shift, on the call's sigmas (x0, then fresh noise, each step)"
    if name == "FlowMatchEulerDiscreteScheduler":
        return "stock `FlowMatchEulerDiscreteScheduler` without shift, on the call's sigmas (deterministic Euler)"
    return "stock `DDIMScheduler` (eta 0, trailing spacing: deterministic DDIM)"


def cfg_note(cfg: Config, info: dict[str, Any]) -> str:
    if cfg.model.cfg_embedding_dim is None or info["lora"]:
        return "no classifier-free guidance (the guidance is distilled into the weights)."
    args = cfg.method_args
    lo, hi = args.teacher_cfg, args.teacher_cfg_max or args.teacher_cfg
    w = info["call"]["guidance_scale"]
    return (f"no classifier-free guidance pass: the student reads the scale through its CFG-scale embedding "
            f"(trained on `guidance_scale` in [{lo:g}, {hi:g}]; the call below uses {w:g}).")


# why a 1-step student's call names its step count (docs/BENCHMARKS.md, "A 1-step student at the pipeline's default
# 4 steps"; bench/one_step_call.py)
ONE_STEP_NOTE = (
    "`LatentConsistencyModelPipeline` defaults to 4 steps, which this 1-step student was not trained for: sampled on "
    "the 4-step schedule [999, 749, 499, 249] the 1-step DMD2 digits student scores FID 72.3 against 7.2 in one step "
    "(digits-classifier features, 1000 samples), so the export keeps one step and the call says "
    "`num_inference_steps=1` (without it diffusers refuses the call).")


def model_card(cfg: Config, info: dict[str, Any], sweep_table: str | None = None) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    steps = len(info["timesteps"])
    teacher = info["teacher"]
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image",
        tags=["distill-diffusion", f"{cfg.method}", f"{steps}-step", "lora" if info["lora"] else "full-weights"],
        base_model=teacher if "/" in teacher and not teacher.startswith(("/", ".")) else None,
    )
    kind = "LoRA adapter for the teacher pipeline" if info["lora"] else f"`{info['pipeline_class']}`"
    no_args = not info["call"]
    lines = [
        f"# {steps}-step {cfg.method.upper()} student of `{teacher}`",
        "",
        f"Distilled with distill-diffusion ({cfg.method}) from the teacher `{teacher}` "
        f"(`{info['teacher_class']}`). Format: {kind}; scheduler: {scheduler_note(info, steps)}, "
        f"sampling timesteps `{info['timesteps']}`, " + cfg_note(cfg, info),
        "",
        "## Use",
        "",
        "```python",
        usage_code(info).rstrip(),
        "```",
        "",
        ("These are the pipeline's defaults: no argument beyond the prompt is needed." if no_args and not info["lora"]
         else "Pass exactly these arguments: the pipeline's defaults (step count, CFG) do not fit this student."),
        *([ONE_STEP_NOTE] if steps == 1 and info["scheduler_class"] == "LCMScheduler" else []),
        ("This pipeline calls `scheduler.step` without the generator, so the noise drawn between steps comes from "
         "torch's global generator: to reproduce `distill-diffusion sample` image for image, call once per seed as "
         "above (`torch.manual_seed(seed)`, then `generator=torch.Generator().manual_seed(seed)`)."
         if info.get("seed_global_rng") else
         "Pass `generator=[torch.Generator().manual_seed(s) for s in seeds]` to reproduce "
         "`distill-diffusion sample` image for image."),
        "",
        "## Evaluation",
        "",
        sweep_table.strip() if sweep_table else "No sweep was run for this export "
        "(`distill-diffusion eval sweep` or `distill-diffusion run` writes one).",
        "",
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
        "## License",
        "",
        LICENSE_NOTE,
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
