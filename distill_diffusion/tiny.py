"""Tiny, randomly initialised Stable Diffusion pipelines built offline, for tests and CPU demos.

`tiny_pipeline(kind)` returns a real diffusers pipeline (``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``) with Stable Diffusion's own component shapes shrunk to a few hundred thousand
parameters each: 8x8x4 latents, 16x16 RGB images, 2-layer CLIP text encoders of width 32 and a CLIP BPE tokenizer
whose vocabulary is built in memory (`build_tokenizer`). Nothing is downloaded; the weights are random but
deterministic in the seed, and the pipelines save and reload with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["PROMPT_WORDS", "TINY_KINDS", "build_tokenizer", "tiny_pipeline"]

TINY_KINDS: tuple[str, ...] = ("sd15", "sd21", "sdxl", "sd3", "flux", "sana", "qwen")  # sd3 .. qwen: `tiny_flow`

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_WORDS: tuple[str, ...] = (
    ("a", "handwritten", "digit")
    + _DIGITS
    + ("photo", "of", "cat", "dog", "red", "blue", "green", "car", "tree", "house")
)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_EOW = "</w>"  # CLIP's end-of-word suffix
_TEXT_WIDTH = 32  # hidden size (and projection size) of every tiny text encoder
_LETTERS = re.compile(r"[^\W\d_]+")  # what CLIP's pre-tokenizer keeps together as one word (`[\p{L}]+`)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP reversible byte -> printable unicode character table (256 entries, in CLIP's order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank (lowest first, leftmost on ties) until none applies, as CLIP's tokenizer does."""
    while len(symbols) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairwise(symbols)))
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _vocab_and_merges(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP vocabulary and merge list in which every word is a single token.

    Merges are only ever appended (with the highest rank so far), so a word made whole earlier stays whole.
    """
    encode = _bytes_to_unicode()
    byte_chars = list(encode.values())
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        word = word.lower()
        if _LETTERS.fullmatch(word) is None:
            raise ValueError(f"tiny tokenizer words must be letters only, got {word!r}")
        chars = [encode[b] for b in word.encode("utf-8")]
        pieces = _bpe(chars[:-1] + [chars[-1] + _EOW], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            pieces = _bpe(pieces, ranks)
    tokens = byte_chars + [c + _EOW for c in byte_chars] + [left + right for left, right in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens + [BOS_TOKEN, EOS_TOKEN]))}
    return vocab, merges


def build_tokenizer(words: Iterable[str] = PROMPT_WORDS, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer, loaded from a vocab.json / merges.txt written to a temporary directory, in which every
    word of `words` (letters only; lower-cased like CLIP) is one token. Unknown words split into byte-level pieces.
    Sequences are padded / truncated by the pipelines to `max_length` (the tokenizer's ``model_max_length``)."""
    vocab, merges = _vocab_and_merges(words)
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
        (Path(tmp) / "merges.txt").write_text(merges_text, encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, local_files_only=True)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    """A 2-layer, width-32 CLIP text encoder config whose special-token ids and length match `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=4 * _TEXT_WIDTH,
        projection_dim=_TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    """A 2-level AutoencoderKL: 16x16x3 images <-> 8x8x4 latents (scale factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    )


def _scheduler(prediction_type: str) -> DDPMScheduler:
    """Stable Diffusion's training noise schedule. ``set_alpha_to_one`` is kept in the config (silently, as a key
    of compatible schedulers) so DDIM / LCM schedulers made with ``from_config`` inherit SD's value."""
    return DDPMScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "clip_sample": False,
            "prediction_type": prediction_type,
            "set_alpha_to_one": False,
        }
    )


def _unet(kind: str) -> UNet2DConditionModel:
    """A 2-level UNet on 8x8x4 latents, one ResNet (and transformer) layer per block, in the layout of `kind`."""
    common = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64)}
    common |= {"layers_per_block": 1}
    if kind == "sd15":  # attention at the highest resolution; `attention_head_dim` acts as the head count
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH,
            attention_head_dim=8,
        )
    if kind == "sd21":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            upcast_attention=True,
        )
    addition_time_embed_dim = 8  # SDXL: no attention at the highest resolution, pooled text + 6 size/crop ids
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _TEXT_WIDTH,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + _TEXT_WIDTH,
    )


def tiny_pipeline(kind: str = "sd15", seed: int = 0) -> DiffusionPipeline:
    """A tiny random Stable Diffusion pipeline of `kind` ("sd15": epsilon prediction, "sd21": v-prediction with
    linear projections, "sdxl": two text encoders and text-time conditioning), 16x16 images from 8x8x4 latents;
    "sd3" and "flux": the flow-matching transformer pipelines of `distill_diffusion.tiny_flow` (8x8x16 latents).

    Weights come from ``torch.manual_seed(seed)`` inside a forked RNG (the caller's global RNG is left untouched),
    so equal seeds give identical weights. The progress bar is disabled.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of: {', '.join(TINY_KINDS)}")
    prediction_type = "v_prediction" if kind == "sd21" else "epsilon"
    pipe: DiffusionPipeline
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("sd3", "flux", "sana", "qwen"):
            from .tiny_flow import tiny_flow_pipeline

            return _ready(tiny_flow_pipeline(kind))
        unet = _unet(kind)
        vae = _vae(0.13025 if kind == "sdxl" else 0.18215)
        tokenizer = build_tokenizer()
        # SD 1.x and SDXL's first encoder are OpenAI CLIP (quick_gelu); SD 2.x and SDXL's second are OpenCLIP (gelu)
        text_encoder = CLIPTextModel(_text_config(tokenizer, "gelu" if kind == "sd21" else "quick_gelu"))
        if kind == "sdxl":
            tokenizer_2 = build_tokenizer()
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=unet,
                scheduler=_scheduler(prediction_type),
                add_watermarker=False,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=_scheduler(prediction_type),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    return _ready(pipe)


def _ready(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as `from_pretrained` leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe
