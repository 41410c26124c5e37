"""Training throughput and peak memory of one training step per method, at SD 1.5 (512 px) and SDXL (1024 px) shapes.

    python bench/gpu.py [--shapes sd15 sdxl] [--methods dmd2 sid ...] [--roles full lora] [--batch 1] [--steps 6]
                        [--precision bf16] [--optimizer adamw8bit] [--attention xformers] [--checkpointing]
                        [--out runs/bench_gpu]
    python bench/gpu.py --shapes tiny          # on CPU: the tiny SD shapes, so the script stays tested

Each (shape, method, roles) runs in a fresh process: the real ``Trainer`` on an in-memory pipeline built from config
with random weights (no download): SD 1.5's UNet (860M) or SDXL's (2.6B) with their VAE configs, one-layer text
encoders of the right widths (prompts are encoded once, before training, so the encoders do not enter a step). Roles
``full``: a full-weight student and critic beside the frozen teacher; ``lora``: student and critic as rank-64 adapters
on the teacher's one frozen base. Every run gets a folder of random images at the model's resolution as real data,
encoded once into a latent cache (`data encode-images`; the adversarial terms, consistency and progressive train on
it; the others ignore it). After ``--warmup`` steps
(both roles' optimizer states exist), ``--steps`` steps are timed; images/s counts student samples per second of
training (the global batch per step). ``--precision`` (default bf16 on a GPU, fp32 on CPU) also stores the frozen
weights in that precision (``train.half_frozen``); ``--optimizer adamw8bit`` keeps Adam's moments in 8 bits. Peak
memory is
``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak resident memory during the timed steps (reset
after warmup through ``/proc/self/clear_refs``) above its post-import level.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import SD15_UNET, status_kib  # noqa: E402

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
          "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
METHODS = ["dmd2", "sid", "vsd", "consistency", "progressive", "ladd", "add"]


def sd_pipeline(shape: str):  # noqa: ANN201
    """An SD 1.5- or SDXL-shaped pipeline from config, random weights (tiny tokenizers, one-layer text encoders)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from distill_diffusion.tiny import tiny_pipeline

    tiny = tiny_pipeline(shape)
    tok = tiny.tokenizer

    def text(width: int, cls):  # noqa: ANN001, ANN202
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width,
                                  projection_dim=width, num_hidden_layers=1, num_attention_heads=width // 64,
                                  max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(SD15_UNET if shape == "sd15" else SDXL_UNET)).eval()
        size = unet.config.sample_size * 8
        vae = AutoencoderKL(**SD_VAE, sample_size=size, scaling_factor=tiny.vae.config.scaling_factor).eval()
        if shape == "sd15":
            return StableDiffusionPipeline(vae=vae, text_encoder=text(768, CLIPTextModel), tokenizer=tok, unet=unet,
                                           scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text(768, CLIPTextModel),
                                         text_encoder_2=text(1280, CLIPTextModelWithProjection), tokenizer=tok,
                                         tokenizer_2=tiny.tokenizer_2, unet=unet, scheduler=tiny.scheduler,
                                         add_watermarker=False)


def random_images(folder: Path, size: int, n: int = 4) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def one(shape: str, method: str, roles: str, args: argparse.Namespace) -> dict:
    """In this process: build the trainer, warm up, time ``args.steps`` steps, report memory and throughput."""
    import torch

    from distill_diffusion.config import parse_config
    from distill_diffusion.data.prepare import encode_images
    from distill_diffusion.trainer import Trainer

    cuda = torch.cuda.is_available()
    base = status_kib("VmRSS")
    pipe = None if shape.startswith("tiny") else sd_pipeline(shape)
    teacher = f"tiny:{shape.split(':')[1]}" if shape.startswith("tiny") else "in-memory"
    lora = 64 if roles == "lora" else None
    timesteps = {"consistency": [999, 499], "progressive": [999, 499]}.get(method, [999])
    method_args = {"progressive": {"start_steps": 4}}.get(method, {})
    raw = {"method": method, method: method_args,
           "model": {"teacher": teacher, "timesteps": timesteps, "student_lora_rank": lora,
                     "critic_lora_rank": 64 if roles == "lora" else 0},
           "train": {"batch_size": args.batch, "steps": 10**6, "progress": False, "checkpoint_every": 10**6,
                     "mixed_precision": args.precision, "optimizer": args.optimizer, "attention": args.attention,
                     "gradient_checkpointing": args.checkpointing}}
    with tempfile.TemporaryDirectory() as tmp:
        size = 16 if pipe is None else pipe.unet.config.sample_size * 8
        # real images as a latent cache (as a user at scale trains): the VAE does not enter a step
        raw["data"] = {"real": random_images(Path(tmp), size)}
        encode_images(parse_config(raw), Path(tmp) / "latents", device="cuda" if cuda else "cpu", workers=0,
                      pipeline=pipe)
        raw["data"] = {"real_cache": str(Path(tmp) / "latents")}
        if method in ("consistency", "progressive"):  # no critic: one role, the student
            raw["model"].pop("critic_lora_rank")
        trainer = Trainer(parse_config(raw), Path(tmp) / "run", pipeline=pipe)
        for _ in range(args.warmup):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:  # the peak of the timed steps, not of building the fp32 pipeline before the frozen weights were cast
            Path("/proc/self/clear_refs").write_text("5")
        t0 = time.time()
        for _ in range(args.steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else \
        (status_kib("VmHWM") - base) / 2**20
    device = torch.cuda.get_device_name() if cuda else "cpu"
    return {"shape": shape, "method": method, "roles": roles, "device": device,
            "precision": {"no": "fp32"}.get(args.precision, args.precision), "optimizer": args.optimizer,
            "batch": args.batch,
            "images_per_s": round(args.batch * args.steps / seconds, 3), "s_per_step": round(seconds / args.steps, 3),
            "peak_gib": round(peak, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["sd15", "sdxl"], choices=["tiny", "sd15", "sdxl"])
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--roles", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", default=None, choices=["no", "fp16", "bf16"], help="bf16 on GPU, no on CPU")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", default="runs/bench_gpu")
    ap.add_argument("--one", nargs=3, metavar=("SHAPE", "METHOD", "ROLES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision is None:
        import torch

        args.precision = "bf16" if torch.cuda.is_available() else "no"
    if args.one:
        print(json.dumps(one(*args.one, args)))
        return
    shapes = [s for shape in args.shapes for s in (["tiny:sd15", "tiny:sdxl"] if shape == "tiny" else [shape])]
    passed = [f"--{k}={v}" for k, v in (("batch", args.batch), ("warmup", args.warmup), ("steps", args.steps),
                                        ("precision", args.precision), ("optimizer", args.optimizer),
                                        ("attention", args.attention))] + ["--checkpointing"] * args.checkpointing
    rows = []
    for shape in shapes:
        for method in args.methods:
            for roles in args.roles:
                done = subprocess.run([sys.executable, __file__, *passed, "--one", shape, method, roles],
                                      capture_output=True, text=True)
                if done.returncode == 0:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                else:  # out of memory is a result too
                    tail = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
                    row = {"shape": shape, "method": method, "roles": roles, "failed": tail}
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = ["| shape | method | roles | device | precision | optimizer | batch | images/s | s/step | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['shape']} | {r['method']} | {r['roles']} | failed: {r['failed']} | | | | | | |")
        else:
            lines.append(f"| {r['shape']} | {r['method']} | {r['roles']} | {r['device']} | {r['precision']} | "
                         f"{r['optimizer']} | {r['batch']} | {r['images_per_s']} | {r['s_per_step']} | "
                         f"{r['peak_gib']} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(rows, indent=1))
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
