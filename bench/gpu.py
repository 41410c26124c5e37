"""Training throughput and peak memory of one training step per method, at SD 1.5 (512 px), SDXL (1024 px),
SD3.5-Large (1024 px) and Flux.1-dev (1024 px) shapes.

    python bench/gpu.py [--shapes sd15 sdxl sd35l flux] [--methods dmd2 sid ...] [--roles full lora] [--batch 1]
                        [--steps 6] [--precision bf16] [--optimizer adamw8bit] [--attention xformers]
                        [--jvp autograd finite_difference]
                        [--checkpointing] [--out runs/bench_gpu]
    python bench/gpu.py --shapes tiny          # on CPU: the tiny SD, SD3 and Flux shapes, so the script stays tested

Each (shape, method, roles) runs in a fresh process: the real ``Trainer`` on an in-memory pipeline built from config
with random weights (no download): SD 1.5's UNet (860M), SDXL's (2.6B), SD3.5-Large's transformer (8.1B) or
Flux.1-dev's (11.9B, built in bf16 on the GPU) with their VAE configs, one-layer text encoders of the right widths
(prompts are encoded once, before training, so the encoders do not enter a step). Roles
``full``: a full-weight student and critic beside the frozen teacher; ``lora``: student and critic as rank-64 adapters
on the teacher's one frozen base. Every run gets a folder of random images at the model's resolution as real data,
encoded once into a latent cache (`data encode-images`; the adversarial terms, consistency and progressive train on
it; the others ignore it). After ``--warmup`` steps
(both roles' optimizer states exist), ``--steps`` steps are timed; images/s counts student samples per second of
training (the global batch per step). ``--methods scm rcm meanflow`` (not in the default list) add the continuous-time
family, one row per ``--jvp`` tangent (torch.func.jvp, or a central finite difference, which the config refuses under
mixed precision: give those rows ``--precision no``; the timed window must hold a student step: rCM makes 4 critic
steps first, so ``--warmup 4 --steps 1`` times its student step alone). ``--precision`` (default bf16 on a GPU, fp32
on CPU) also stores the frozen weights in that precision (``train.half_frozen``); ``--optimizer adamw8bit`` keeps
Adam's moments in 8 bits. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak
resident memory during the timed steps (reset after warmup through ``/proc/self/clear_refs``) above its post-import
level.
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
# the continuous-time family: a tangent per step, by torch.func.jvp or a central finite difference (`--jvp`)
JVP_METHODS = ["scm", "rcm", "meanflow"]
# stabilityai/stable-diffusion-3.5-large and black-forest-labs/FLUX.1-dev transformer/config.json
SD35L_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38,
                     "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                     "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
                     "pos_embed_max_size": 192, "qk_norm": "rms_norm"}
FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLOW_SHAPES = ("sd35l", "flux")


def one_layer_clip(tok, width: int, cls):  # noqa: ANN001, ANN201
    """A one-layer CLIP text encoder of ``cls`` with the real model's output width, for ``tok``'s vocabulary."""
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width, projection_dim=width,
                              num_hidden_layers=1, num_attention_heads=width // 64,
                              max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def sd_pipeline(shape: str):  # noqa: ANN201
    """An SD 1.5- or SDXL-shaped pipeline from config, random weights (tiny tokenizers, one-layer text encoders)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from distill_diffusion.tiny import tiny_pipeline

    tiny = tiny_pipeline(shape)
    tok = tiny.tokenizer

    def text(width: int, cls):  # noqa: ANN001, ANN202
        return one_layer_clip(tok, width, cls)

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


def flow_pipeline(shape: str):  # noqa: ANN201
    """An SD3.5-Large- or Flux.1-dev-shaped pipeline: the transformer from its hub config with random weights, built
    in bf16 on the GPU when there is one (12B parameters in fp32 on the host would be 48 GB), one-layer text encoders
    of the real output widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096), the 16-channel VAE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from distill_diffusion.tiny import tiny_pipeline

    tiny = tiny_pipeline("sd3" if shape == "sd35l" else "flux")
    tok = tiny.tokenizer

    def clip(width: int, cls):  # noqa: ANN001, ANN202
        return one_layer_clip(tok, width, cls)

    t5_tok = tiny.tokenizer_3 if shape == "sd35l" else tiny.tokenizer_2
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=4096, d_kv=64, d_ff=256, num_layers=1,
                                 num_heads=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.random.fork_rng(), torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            net = (SD3Transformer2DModel(**SD35L_TRANSFORMER) if shape == "sd35l" else
                   FluxTransformer2DModel(**FLUX_TRANSFORMER)).eval()
        finally:
            torch.set_default_dtype(default)
    scaling, shift = (1.5305, 0.0609) if shape == "sd35l" else (0.3611, 0.1159)
    vae = AutoencoderKL(**{**SD_VAE, "latent_channels": 16}, sample_size=1024, scaling_factor=scaling,
                        shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False).eval()
    if shape == "sd35l":
        return StableDiffusion3Pipeline(transformer=net, scheduler=tiny.scheduler, vae=vae,
                                        text_encoder=clip(768, CLIPTextModelWithProjection), tokenizer=tok,
                                        text_encoder_2=clip(1280, CLIPTextModelWithProjection),
                                        tokenizer_2=tiny.tokenizer_2, text_encoder_3=t5, tokenizer_3=t5_tok)
    return FluxPipeline(transformer=net, scheduler=tiny.scheduler, vae=vae, text_encoder=clip(768, CLIPTextModel),
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok)


def random_images(folder: Path, size: int, n: int = 4) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return str(folder)


def label(method: str) -> str:
    """``scm:autograd`` -> ``scm (autograd)``; a plain name as it is."""
    name, _, jvp = method.partition(":")
    return name + (f" ({jvp})" if jvp else "")


def one(shape: str, method: str, roles: str, args: argparse.Namespace) -> dict:
    """In this process: build the trainer, warm up, time ``args.steps`` steps, report memory and throughput.
    ``method`` is a name, or ``name:jvp`` for the continuous-time family (autograd or finite_difference)."""
    import torch

    from distill_diffusion.config import parse_config
    from distill_diffusion.data.prepare import encode_images
    from distill_diffusion.trainer import Trainer

    cuda = torch.cuda.is_available()
    base = status_kib("VmRSS")
    from distill_diffusion.factory import image_size

    pipe = None if shape.startswith("tiny") else flow_pipeline(shape) if shape in FLOW_SHAPES else sd_pipeline(shape)
    teacher = f"tiny:{shape.split(':')[1]}" if shape.startswith("tiny") else "in-memory"
    lora = 64 if roles == "lora" else None
    flow = shape.split(":")[-1] in ("sd3", "flux", *FLOW_SHAPES)
    two = [1000.0, 500.0] if flow else [999, 499]  # the teacher's trailing 2-step grid
    timesteps = two if method in ("consistency", "progressive") else two[:1]
    spec = method
    method, _, jvp = spec.partition(":")
    method_args = {"progressive": {"start_steps": 4}}.get(method, {})
    if jvp:  # the tangent from step one (no warm-up), as in most of a run
        method_args = {"jvp": jvp, **({"tangent_warmup": 0} if method != "meanflow" else {})}
    raw = {"method": method, method: method_args,
           "model": {"teacher": teacher, "timesteps": timesteps, "student_lora_rank": lora,
                     "critic_lora_rank": 64 if roles == "lora" else 0},
           "train": {"batch_size": args.batch, "steps": 10**6, "progress": False, "checkpoint_every": 10**6,
                     "mixed_precision": args.precision, "optimizer": args.optimizer, "attention": args.attention,
                     "gradient_checkpointing": args.checkpointing}}
    with tempfile.TemporaryDirectory() as tmp:
        size = 16 if pipe is None else image_size(pipe)
        # real images as a latent cache (as a user at scale trains): the VAE does not enter a step
        raw["data"] = {"real": random_images(Path(tmp), size)}
        encode_images(parse_config(raw), Path(tmp) / "latents", device="cuda" if cuda else "cpu", workers=0,
                      pipeline=pipe)
        raw["data"] = {"real_cache": str(Path(tmp) / "latents")}
        if method in ("consistency", "progressive", "scm", "meanflow"):  # no critic: one role, the student
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
    return {"shape": shape, "method": label(spec), "roles": roles, "device": device,
            "precision": {"no": "fp32"}.get(args.precision, args.precision), "optimizer": args.optimizer,
            "batch": args.batch,
            "images_per_s": round(args.batch * args.steps / seconds, 3), "s_per_step": round(seconds / args.steps, 3),
            "peak_gib": round(peak, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["sd15", "sdxl"], choices=["tiny", "sd15", "sdxl", *FLOW_SHAPES])
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS + JVP_METHODS)
    ap.add_argument("--jvp", nargs="*", default=["autograd"], choices=["autograd", "finite_difference"],
                    help="the tangent of scm / rcm / meanflow, one row each (finite_difference needs --precision no)")
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
    tiny = ["tiny:sd15", "tiny:sdxl", "tiny:sd3", "tiny:flux"]
    shapes = [s for shape in args.shapes for s in (tiny if shape == "tiny" else [shape])]
    passed = [f"--{k}={v}" for k, v in (("batch", args.batch), ("warmup", args.warmup), ("steps", args.steps),
                                        ("precision", args.precision), ("optimizer", args.optimizer),
                                        ("attention", args.attention))] + ["--checkpointing"] * args.checkpointing
    rows = []
    for shape in shapes:
        for method in [m + (f":{j}" if m in JVP_METHODS else "") for m in args.methods
                       for j in (args.jvp if m in JVP_METHODS else [""])]:
            for roles in args.roles:
                done = subprocess.run([sys.executable, __file__, *passed, "--one", shape, method, roles],
                                      capture_output=True, text=True)
                if done.returncode == 0:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                else:  # out of memory is a result too
                    tail = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
                    row = {"shape": shape, "method": label(method), "roles": roles, "failed": tail}
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
