"""Re-create the embedded "digits" teacher: a Stable-Diffusion-shaped text-to-image model trained on sklearn digits.

Components are exactly SD 1.5's kinds (``StableDiffusionPipeline``): an ``AutoencoderKL`` (16x16x3 images <-> 8x8x4
latents; the source digits are 8x8), a CLIP text encoder with a ``CLIPTokenizer`` built from local vocab/merges
(frozen at its seeded random initialisation: the ten prompts differ in one token, which cross-attention learns to
read), and a ``UNet2DConditionModel`` with epsilon prediction on SD's scaled_linear schedule. Prompts are "a
handwritten digit seven" etc., dropped to "" 10% of the time so classifier-free guidance works.

``distill-diffusion zoo train-digits OUT_DIR`` runs `train_digits`; the weights shipped in the package are what
that command produced (time and settings in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import _scheduler, _text_config, build_tokenizer
from .digits_data import PROMPTS, TEACHER_SIZE, digits_split, shift_augment, to_rgb

PROMPT_DROPOUT = 0.1


def build_vae():  # noqa: ANN201
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=TEACHER_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
    )


def build_unet():  # noqa: ANN201
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TEACHER_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )


def teacher_step(loss: torch.Tensor, net: torch.nn.Module, opt: torch.optim.Optimizer, sched: object,
                 ema: dict[str, torch.Tensor], step: int) -> float:
    """One update of an embedded teacher: backward, gradient norm clipped at 1, the optimizer and its one-cycle
    schedule, the weight EMA; returns the loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()
    ema_update(ema, net, step)
    return loss.item()


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], net: torch.nn.Module, step: int) -> None:
    """The teachers' weight EMA: decay min(0.999, (1 + step) / (10 + step)), integer buffers copied."""
    decay = min(0.999, (1 + step) / (10 + step))
    for k, v in net.state_dict().items():
        ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)


def train_vae(vae, images: torch.Tensor, steps: int, gen: torch.Generator, progress: bool,  # noqa: ANN001
              max_shift: int = 1) -> None:
    """Reconstruction MSE + 1e-6 KL (SD's autoencoder trades off the same way, without the GAN/LPIPS terms)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="vae", disable=not progress):
        idx = torch.randint(0, len(images), (64,), generator=gen)
        x = to_rgb(shift_augment(images[idx], max_shift, gen))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()


def train_digits(out_dir: str | Path, vae_steps: int = 800, unet_steps: int = 6500, batch_size: int = 64,
                 seed: int = 0, progress: bool = True, lr: float = 1e-3, max_shift: int = 0,
                 init_from: str | Path | None = None) -> dict:
    """Train VAE then UNet and save a ``StableDiffusionPipeline`` directory (safetensors) at out_dir.

    From scratch by default; ``init_from`` (a pipeline directory made by this function) continues from its VAE,
    text encoder and UNet instead, e.g. to fine-tune without the shift augmentation (``max_shift=0``).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    t0 = time.time()
    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = digits_split(TEACHER_SIZE)["train"]

    init = None
    if init_from is not None:
        from diffusers import DiffusionPipeline

        init = DiffusionPipeline.from_pretrained(init_from, local_files_only=True)

    # 1. autoencoder; its scaling factor makes the latents unit-variance, as SD's 0.18215 does
    vae = build_vae() if init is None else init.vae
    if vae_steps > 0:
        train_vae(vae, images, vae_steps, gen, progress, max_shift)
        with torch.no_grad():
            latents = torch.cat([vae.encode(to_rgb(images[i : i + 256])).latent_dist.mean
                                 for i in range(0, len(images), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.eval().requires_grad_(False)
    t_vae = time.time() - t0

    # 2. frozen text encoder; the prompt embeddings are computed once
    if init is None:
        tokenizer = build_tokenizer()
        text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu")).eval().requires_grad_(False)
    else:
        tokenizer, text_encoder = init.tokenizer, init.text_encoder.eval().requires_grad_(False)
    ids = tokenizer(list(PROMPTS) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0]  # (11, L, 32); index 10 is the empty prompt

    # 3. the UNet: epsilon prediction on SD's schedule on posterior samples of the latents (encoded once when the
    # images are not shifted, else on the fly)
    if max_shift == 0:
        with torch.no_grad():
            posts = [vae.encode(to_rgb(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
        mean_all, std_all = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    scheduler = _scheduler("epsilon")
    unet = build_unet() if init is None else init.unet.requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=unet_steps, pct_start=0.05)
    abar = scheduler.alphas_cumprod
    unet.train()
    losses = []
    for step in tqdm(range(unet_steps), desc="unet", disable=not progress):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        with torch.no_grad():
            if max_shift == 0:
                mean, std = mean_all[idx], std_all[idx]
            else:
                post = vae.encode(to_rgb(shift_augment(images[idx], max_shift, gen))).latent_dist
                mean, std = post.mean, post.std
            x0 = (mean + std * torch.randn(mean.shape, generator=gen)) * vae.config.scaling_factor
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < PROMPT_DROPOUT] = 10
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].sqrt().reshape(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
        pred = unet(a * x0 + s * eps, t, encoder_hidden_states=embeds[y]).sample
        losses.append(teacher_step(F.mse_loss(pred, eps), unet, opt, sched, ema, step))
    unet.load_state_dict(ema)
    unet.eval()

    # 4. save as a plain diffusers pipeline, atomically
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {
        "seconds_total": round(time.time() - t0, 1), "seconds_vae": round(t_vae, 1), "vae_steps": vae_steps,
        "unet_steps": unet_steps, "batch_size": batch_size, "seed": seed, "lr": lr, "max_shift": max_shift,
        "init_from": None if init_from is None else str(init_from),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "final_loss_mean_last_500": sum(losses[-500:]) / len(losses[-500:]),
        "torch": torch.__version__,
    }
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info
