"""Re-create the embedded "digits-flow" teacher: a Stable-Diffusion-3-shaped flow-matching model trained on sklearn
digits (``embedded:digits-flow``).

The components are SD3's kinds (``StableDiffusion3Pipeline``): an ``SD3Transformer2DModel`` (MMDiT joint blocks,
patch 2) predicting the flow velocity ``u = eps - x0`` on the straight path ``x_t = (1 - s) x0 + s eps``, two CLIP text
encoders with projections (frozen at their seeded random initialisation, as the UNet teacher's), and
``FlowMatchEulerDiscreteScheduler``. Training follows SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers",
Sec. 3.1): the velocity MSE at s drawn from the logit-normal density (m = 0, s = 1), the prompts dropped to "" 10% of
the time so classifier-free guidance works.

The autoencoder is the UNet teacher's (``embedded:digits``: 16x16x3 images <-> 8x8x4 latents) with SD3's
``shift_factor`` set to 0: it serves, and both teachers then share one image space. The T5 is a tiny random one, as
in ``tiny:sd3``. Its cost shapes the transformer: the pipeline pads every prompt to 256 T5 tokens by default, so the
joint blocks carry 16 + 256 text tokens beside 16 image tokens, and a step costs about four times what it would with
CLIP alone (0.40 s vs about 0.1 s for this transformer at batch 64 on one thread, measured). SD3's T5-free mode
(``text_encoder_3=None``) would avoid that, but diffusers then needs ``text_encoder_3=None, tokenizer_3=None`` at
every ``from_pretrained`` (a load-time argument every export of a student would inherit), so the T5 stays and the
transformer is kept small: 3 joint blocks of width 64 (2 heads of 32), 0.44 M parameters.

``distill-diffusion zoo train-digits-flow OUT_DIR`` runs `train_digits_flow`; the weights shipped in the package are
what that command produced.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny import _text_config, build_tokenizer
from .digits_data import PROMPTS, TEACHER_SIZE, digits_split, to_rgb
from .train_digits import PROMPT_DROPOUT, teacher_step

TEXT_WIDTH = 32  # each CLIP's width; SD3 concatenates the two (64), the T5's width, the joint attention width


def build_transformer():  # noqa: ANN201
    """A 3-layer MMDiT, width 64 (2 heads of 32), patch 2 over the 8x8x4 latents: 16 image tokens, 0.44 M
    parameters."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=TEACHER_SIZE // 2, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=3, attention_head_dim=32, num_attention_heads=2,
                                 joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=64,
                                 pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=TEACHER_SIZE // 2)


def build_pipeline(transformer, vae):  # noqa: ANN001, ANN201
    """SD3's pipeline around ``transformer`` and ``vae`` with freshly seeded tiny CLIPs and T5 (the caller seeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from ..tiny_flow import _t5, build_t5_tokenizer

    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), build_t5_tokenizer()
    encoders = [CLIPTextModelWithProjection(_text_config(tok, act)).eval().requires_grad_(False)
                for tok, act in ((tokenizer, "quick_gelu"), (tokenizer_2, "gelu"))]
    return StableDiffusion3Pipeline(transformer=transformer, vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
                                    text_encoder_3=_t5(tokenizer_3, 2 * TEXT_WIDTH).eval().requires_grad_(False))


def train_digits_flow(out_dir: str | Path, steps: int = 6000, batch_size: int = 64, seed: int = 0,
                      progress: bool = True, lr: float = 1e-3, vae_from: str = "digits") -> dict:
    """Train the transformer (the autoencoder is ``embedded:<vae_from>``'s) and save a ``StableDiffusion3Pipeline``
    directory (safetensors) at ``out_dir``, atomically."""
    from .. import zoo

    t0 = time.time()
    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = digits_split(TEACHER_SIZE)["train"]
    vae = zoo.load(vae_from).vae.eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's latent shift; the UNet teacher's latents are centred already
    pipe = build_pipeline(build_transformer(), vae)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(list(PROMPTS) + [""], None, None, do_classifier_free_guidance=False)
        posts = [vae.encode(to_rgb(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
    mean_all, std_all = torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])
    scale = vae.config.scaling_factor

    net = pipe.transformer.train()
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-2)
    # 5% warm-up; at least two steps of it, which OneCycleLR needs (a few-step smoke run gets half its steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.5, max(0.05, 2 / steps)))
    losses = []
    for step in tqdm(range(steps), desc="transformer", disable=not progress):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x0 = (mean_all[idx] + std_all[idx] * torch.randn(mean_all[idx].shape, generator=gen)) * scale
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=gen) < PROMPT_DROPOUT] = 10
        s = torch.sigmoid(torch.randn(batch_size, generator=gen))  # SD3's logit-normal density, m = 0, s = 1
        eps = torch.randn(x0.shape, generator=gen)
        x_s = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
        pred = net(hidden_states=x_s, encoder_hidden_states=embeds[y], pooled_projections=pooled[y],
                   timestep=s * 1000).sample
        losses.append(teacher_step(F.mse_loss(pred, eps - x0), net, opt, sched, ema, step))
    net.load_state_dict(ema)
    net.eval()

    tmp = out_dir.with_name(f".tmp_{out_dir.name}")
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {
        "seconds_total": round(time.time() - t0, 1), "steps": steps, "batch_size": batch_size, "seed": seed,
        "lr": lr, "vae_from": f"embedded:{vae_from}", "timestep_density": "logit-normal(0, 1)",
        "transformer_params": sum(p.numel() for p in net.parameters()),
        "final_loss_mean_last_500": sum(losses[-500:]) / len(losses[-500:]), "torch": torch.__version__,
    }
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info
