"""Peak memory of training steps with a full-weight critic vs a LoRA critic on the teacher's own UNet, on CPU.

    python bench/memory.py [--method dmd2] [--widths 1.0 0.5] [--students full lora] [--out runs/bench_memory]

Each variant runs in a fresh process: the real `Trainer` on an in-memory ``StableDiffusionPipeline`` whose UNet has
SD 1.5's config (``--widths`` scales its channels; 1.0 is SD 1.5 itself, random weights), batch 1, 64x64x4 latents,
fp32, two critic and two student updates (so both roles' Adam states exist), and reports the process's peak
resident memory (``ru_maxrss``) above its resident memory right after the imports. The tiny SD shape
(``tiny:sd15``) runs first. A variant whose predicted weights + gradients + Adam states exceed 90% of physical
memory is not started (it would be killed); the table says so and gives the prediction.

Byte accounting (fp32, AdamW: 4 bytes of weights per parameter, 4 of gradient, 8 of optimizer states):
  full student, full critic: teacher W + student (W + 2W Adam) + critic (W + 2W Adam) + one role's gradients W = 8 W
  full student, LoRA critic: teacher/critic base W + student (W + 2W Adam) + gradients W + the adapter's own   = 5 W
  LoRA student, full critic: teacher/student base W + critic (W + 2W Adam) + gradients W + the adapter's own   = 5 W
  LoRA student, LoRA critic: one base W for all three roles + two adapters                                    = 1 W
(+ activations). The trainer frees each role's gradients after its step; a trainer that kept both roles' gradients
would hold 9 W in the first row. ``--students`` picks the student kinds (a rank-64 LoRA student, like the critic).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_PARAMS = 859_520_964  # UNet2DConditionModel(**SD15_UNET) parameter count


def rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def status_kib(field: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident since start or the last reset) of this process."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def sd15_pipeline(width: float):  # noqa: ANN201
    """tiny:sd15's VAE and tokenizer, a 768-wide 1-layer CLIP text encoder, and an SD 1.5-config UNet scaled by
    ``width`` (channels rounded to multiples of 32), random weights."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from distill_diffusion.tiny import tiny_pipeline

    tiny = tiny_pipeline("sd15")
    tok = tiny.tokenizer
    config = dict(SD15_UNET, block_out_channels=[max(32, round(c * width / 32) * 32)
                                                 for c in SD15_UNET["block_out_channels"]])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).eval()
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=768, projection_dim=768, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    return StableDiffusionPipeline(vae=tiny.vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def one(shape: str, student: str, critic: str, method: str, out: str) -> dict:
    """Run in this process: build the trainer, do 2 critic + 2 student updates, report memory."""
    import torch

    from distill_diffusion.config import parse_config
    from distill_diffusion.trainer import Trainer

    torch.set_num_threads(2)
    base = status_kib()
    pipe = None if shape == "tiny" else sd15_pipeline(float(shape))
    teacher = "tiny:sd15" if shape == "tiny" else "in-memory"
    raw = {"method": method, method: {"critic_updates": 1},
           "model": {"teacher": teacher, "timesteps": [999], "critic_lora_rank": 0 if critic == "full" else 64,
                     "student_lora_rank": None if student == "full" else 64},
           "train": {"batch_size": 1, "steps": 4, "progress": False, "checkpoint_every": 1000}}
    trainer = Trainer(parse_config(raw), Path(out) / f"{shape}_{student}_{critic}", pipeline=pipe)
    built = status_kib()
    t0 = time.time()
    for _ in range(4):
        trainer.train_step()
    n = {role: sum(p.numel() for p in ps) for role, ps in trainer.params.items()}
    net = trainer.models.teacher.denoiser.net
    unet_params = sum(p.numel() for name, p in net.named_parameters() if ".lora_" not in name)
    return {"shape": shape, "student": student, "critic": critic, "method": method, "unet_params": unet_params,
            "trainable_params": n, "rss_after_build_gib": round((built - base) / 2**20, 2),
            "peak_gib": round((rss_kib() - base) / 2**20, 2), "seconds_4_steps": round(time.time() - t0, 1)}


def predicted_gib(params: int, student: str, critic: str) -> float:
    units = {("full", "full"): 8, ("full", "lora"): 5, ("lora", "full"): 5, ("lora", "lora"): 1}[student, critic]
    return units * 4 * params / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="dmd2")
    ap.add_argument("--widths", nargs="*", default=["1.0", "0.75"])
    ap.add_argument("--students", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--out", default="runs/bench_memory")
    ap.add_argument("--one", nargs=3, metavar=("SHAPE", "STUDENT", "CRITIC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.method, args.out)))
        return
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows = []
    for shape in ["tiny", *args.widths]:
        for student in args.students:
            for critic in ("full", "lora"):
                row = {"shape": shape, "student": student, "critic": critic, "method": args.method}
                predicted = predicted_gib(SD15_PARAMS * float(shape) ** 2, student, critic) if shape != "tiny" else 0
                if predicted > 0.9 * total_gib:
                    row["skipped"] = f"predicted {predicted:.1f} GiB of states alone > 90% of {total_gib:.1f} GiB"
                else:
                    cmd = [sys.executable, __file__, "--method", args.method, "--out", args.out,
                           "--one", shape, student, critic]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        row["skipped"] = f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"
                    else:
                        row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(row, flush=True)
    lines = ["| UNet | student | critic | UNet params | trainable (student / critic) | peak GiB | after build GiB "
             "| LoRA-critic cut |", "|---|---|---|---|---|---|---|---|"]
    peaks = {(r["shape"], r["student"], r["critic"]): r.get("peak_gib") for r in rows}
    for r in rows:
        name = "tiny:sd15" if r["shape"] == "tiny" else f"SD 1.5 x{r['shape']}"
        if "skipped" in r:
            lines.append(f"| {name} | {r['student']} | {r['critic']} | | | not run: {r['skipped']} | | |")
            continue
        full = peaks.get((r["shape"], r["student"], "full"))
        cut = f"{100 * (1 - r['peak_gib'] / full):.0f}%" if r["critic"] == "lora" and full else ""
        tp = r["trainable_params"]
        lines.append(f"| {name} | {r['student']} | {r['critic']} | {r['unet_params'] / 1e6:.1f}M | "
                     f"{tp['student'] / 1e6:.2f}M / {tp['critic'] / 1e6:.2f}M | {r['peak_gib']} | "
                     f"{r['rss_after_build_gib']} | {cut} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "memory.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
