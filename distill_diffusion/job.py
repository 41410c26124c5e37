"""The main job, ``distill-diffusion run CONFIG``: distill -> export -> sweep (student vs teacher) -> report.

Run directory after a job::

    RUN/                     the training run (config.yaml, checkpoints/, final/, logs.jsonl)
    RUN/export/              the student as a plain diffusers pipeline (model card with the sweep table)
    RUN/export_lora/         LoRA students only: the adapter for the teacher pipeline
    RUN/sweep/               sweep.json, sweep.md, fid_vs_nfe.png (the export and the teacher, same seeds)
    RUN/report.md            the table, the plot, grids: teacher at 50 steps vs the student, same prompts and seeds
    RUN/grid_teacher.png, RUN/grid_student.png

The sweep measures the export, loaded the way a diffusers user loads it, not the training-time student.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from .config import Config
from .data import first_prompts, read_prompt_file
from .errors import ConfigError
from .eval.generate import generate, load_model
from .eval.sweep import run_sweep, table, verdicts
from .files import write_text_atomic
from .pipelines.export import export_run, update_card
from .pipelines.model_card import usage_code
from .preview import PREVIEW_SEED, image_grid
from .trainer import Trainer


def _teacher_spec(cfg: Config) -> str:
    teacher = cfg.model.teacher
    if teacher.startswith("tiny:") or teacher == "gmm":
        raise ConfigError(f"`run` needs a teacher that can be sampled from disk (embedded:digits or a diffusers "
                          f"directory), not {teacher!r}; use `distill` for it")
    return teacher


def sample_grids(cfg: Config, student_spec: str, out_dir: Path) -> tuple[Path, Path]:
    """Teacher (``grid_teacher_steps`` DDIM steps, ``grid_teacher_cfg``) and student on the same prompts and
    seeds: one row per prompt, one column per seed."""
    ec = cfg.eval
    prompts = first_prompts(cfg.data, ec.grid_prompts)
    all_prompts = [p for p in prompts for _ in range(ec.grid_seeds)]
    seeds = [PREVIEW_SEED + j for _ in prompts for j in range(ec.grid_seeds)]
    paths = []
    for name, spec, kwargs in (
        ("teacher", _teacher_spec(cfg), {"steps": ec.grid_teacher_steps, "cfg_scale": ec.grid_teacher_cfg}),
        ("student", student_spec, {}),
    ):
        images, _ = generate(load_model(spec), all_prompts, seeds, progress=False, **kwargs)
        scale = max(1, 64 // images.shape[1])  # tiny images (digits are 16 px) are shown enlarged, nearest
        grid = image_grid(images, cols=ec.grid_seeds)
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
        path = out_dir / f"grid_{name}.png"
        grid.save(path)
        paths.append(path)
    return paths[0], paths[1]


def run_job(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path | None:
    run_dir = Path(run_dir)
    teacher = _teacher_spec(cfg)
    ec = cfg.eval
    prompts = None
    if ec.ref != "digits":
        if ec.prompt_file is None:
            raise ConfigError("eval.prompt_file is required when eval.ref is not digits")
        prompts = read_prompt_file(ec.prompt_file)
        if not prompts:
            raise ConfigError(f"eval.prompt_file {ec.prompt_file!r} has no non-blank line")
    times = {}
    done = (run_dir / "final" / "student.safetensors").is_file() and resume
    if not done:  # a finished run's training time is in its logs.jsonl, not in this call: the report says so
        t0 = time.time()
        trainer = Trainer(cfg, run_dir, resume=resume)
        trainer.train()
        if not trainer.is_main:  # data-parallel training is done; export, sweep and report are one process's work
            return None
        times["distill_s"] = time.time() - t0

    t0 = time.time()
    export_dir = export_run(run_dir, lora_student=cfg.model.student_lora_rank is not None)["export"]
    times["export_s"] = time.time() - t0

    t0 = time.time()
    rows = run_sweep([str(export_dir), teacher], ec.ref, ec.nfe, ec.solvers, ec.teacher_cfg, ec.num_samples,
                     run_dir / "sweep", features=ec.features, batch_size=ec.batch_size, prompts=prompts,
                     cache_dir=run_dir / "sweep", progress=progress, extra_features=ec.extra_features)
    times["sweep_s"] = time.time() - t0
    sweep_md = table(rows)
    # the model card gets this student's table (rewritten in place: the export is already complete)
    update_card(export_dir, cfg, sweep_md)

    t0 = time.time()
    sample_grids(cfg, str(export_dir), run_dir)
    times["grids_s"] = time.time() - t0
    write_report(cfg, run_dir, rows, times)
    return run_dir / "report.md"


def _headline(rows: list[dict], steps: int) -> list[str]:
    """The student, the teacher rows a reader compares it with, and what each feature space says of each pair."""
    student = [r for r in rows if r["solver"] == "student"]
    teacher = [r for r in rows if r["solver"] != "student"]
    if not student:
        return []
    s = student[0]
    acc = "prompt_accuracy" in s

    def fmt(r: dict) -> str:
        extra = f", prompt accuracy {r['prompt_accuracy']:.3f}" if acc else ""
        pca = f"; pixel-PCA FID {r['fid_pca']:.3f}, recall {r['recall_pca']:.3f}" if "fid_pca" in r else ""
        return f"FID {r['fid']:.2f}, recall {r['recall']:.3f}{pca}{extra} ({r['solver']}, CFG {r['guidance']:g}, " \
               f"{r['steps']} steps, NFE {r['nfe']})"

    lines = [f"- Student, {steps} steps: {fmt(s)}"]
    pairs = []
    same_nfe = [r for r in teacher if r["nfe"] == s["nfe"]]
    if same_nfe:
        best = min(same_nfe, key=lambda r: r["fid"])
        lines.append(f"- Teacher at the same NFE, best row: {fmt(best)}")
        pairs.append(best)
    same_steps = [r for r in teacher if r["steps"] == s["steps"]]
    if same_steps:
        best = min(same_steps, key=lambda r: r["fid"])
        lines.append(f"- Teacher with the same number of steps, best row: {fmt(best)}")
    if teacher:
        top = max(r["nfe"] for r in teacher)
        best = min((r for r in teacher if r["nfe"] == top), key=lambda r: r["fid"])
        lines.append(f"- Teacher at NFE {top}, best row: {fmt(best)}")
        pairs.append(best)
    lines += ["", *(f"- {v}" for r in pairs for v in verdicts(s, r))]
    return lines


def write_report(cfg: Config, run_dir: Path, rows: list[dict], times: dict[str, float]) -> Path:
    steps = len(cfg.model.timesteps)
    export_info = json.loads((run_dir / "export" / "export.json").read_text())
    ec = cfg.eval
    lines = [
        f"# {cfg.method.upper()}: {steps}-step student of `{cfg.model.teacher}`",
        "",
        f"Student timesteps `{cfg.model.timesteps}`; {cfg.train.steps} training steps, batch {cfg.train.batch_size}, "
        f"seed {cfg.train.seed}. Wall time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in times.items())
        + ("" if "distill_s" in times else " (trained before this call: its seconds are in logs.jsonl)") + ".",
        "",
        "## Result",
        "",
        *_headline(rows, steps),
        "",
        f"FID against `{ec.ref}` with {ec.num_samples} samples per row (same prompts and seeds for every row); "
        "the student row is the export loaded with plain diffusers. Two feature spaces where the reference is a "
        "set of images: the primary one (the digits classifier's for `digits`, Inception's otherwise) and pixel "
        "PCA of the reference (trained on nothing). KID is computed on features standardised by the reference, "
        "with its spread over subsets in brackets; at these sample sizes trust FID and precision / recall over it "
        "(docs/BENCHMARKS.md, \"KID on the digits features\").",
        "",
        table(rows),
        "",
        "![FID against NFE](sweep/fid_vs_nfe.png)",
        "",
        "## Samples (same prompts and seeds; one row per prompt)",
        "",
        f"Teacher, {ec.grid_teacher_steps} DDIM steps, CFG {ec.grid_teacher_cfg:g}:",
        "",
        "![teacher](grid_teacher.png)",
        "",
        f"Student, {steps} steps:",
        "",
        "![student](grid_student.png)",
        "",
        "## Load the export",
        "",
        "```python",
        usage_code(export_info, "export").rstrip(),
        "```",
        "",
    ]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines))
    write_text_atomic(run_dir / "report.json", json.dumps({"times": times, "rows": rows}, indent=1))
    return path
