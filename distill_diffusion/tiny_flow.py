"""Tiny, randomly initialised flow-matching transformer pipelines built offline: ``tiny:sd3``, ``tiny:flux``,
``tiny:sana`` and ``tiny:qwen`` (Qwen-Image).

The component classes and wiring of Stable Diffusion 3 (``StableDiffusion3Pipeline``: an ``SD3Transformer2DModel``,
two CLIP encoders with projections and a T5 encoder) and Flux.1 (``FluxPipeline``: a ``FluxTransformer2DModel``
with 2x2-packed latents, position ids and dev's guidance embedding, one CLIP and one T5 encoder), shrunk to a few
hundred thousand parameters: 16x16 RGB images, 8x8x16 latents (a 16-channel VAE with SD3's ``shift_factor``), width-32
text encoders. The CLIP tokenizer is the package's in-memory BPE one (`distill_diffusion.tiny.build_tokenizer`); the
T5 tokenizer is a ``tokenizers`` WordLevel model over the same words in ``PreTrainedTokenizerFast``. Nothing is
downloaded; weights are random and deterministic in the seed; both round-trip through ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .tiny import _TEXT_WIDTH, PROMPT_WORDS, _text_config, build_tokenizer

FLOW_KINDS: tuple[str, ...] = ("sd3", "flux", "sana", "qwen")
T5_MAX_LENGTH = 32  # the T5 tokenizer's model_max_length; the pipelines pad to their own max_sequence_length


def build_t5_tokenizer(words: tuple[str, ...] = PROMPT_WORDS, gemma: bool = False) -> PreTrainedTokenizerFast:
    """A word-level T5-style tokenizer: ``<pad>`` 0, ``</s>`` 1 (appended to every sequence, as T5's is), ``<unk>``
    2, then one id per word; whitespace and punctuation split words; lower-cased. ``gemma``: Gemma's convention
    instead, ``<bos>`` 3 put in front of every sequence and nothing appended."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<bos>": 3}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ("<bos>", 3) if gemma else ("</s>", 1)
    template = "<bos> $A" if gemma else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[special])
    extra = {"bos_token": "<bos>"} if gemma else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1024 if gemma else T5_MAX_LENGTH,
                                   pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", **extra)


def _t5(tokenizer: PreTrainedTokenizerFast, width: int = _TEXT_WIDTH) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width,
                                   num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae16() -> AutoencoderKL:
    """A 2-level AutoencoderKL: 16x16x3 images <-> 8x8x16 latents, SD3's latent scaling and shift."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=16, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609,
                         use_quant_conv=False, use_post_quant_conv=False)


def _sd3() -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), build_t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_TEXT_WIDTH,
                                        caption_projection_dim=_TEXT_WIDTH, pooled_projection_dim=2 * _TEXT_WIDTH,
                                        out_channels=16, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae16(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, "quick_gelu")),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu")),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3),
        tokenizer_3=tokenizer_3,
    )


def _flux() -> FluxPipeline:
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=_TEXT_WIDTH, pooled_projection_dim=_TEXT_WIDTH,
                                         guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae16(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, "quick_gelu")),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2),
        tokenizer_2=tokenizer_2,
    )


def _sana() -> Any:
    """SANA's wiring (``SanaPipeline``): a ``SanaTransformer2DModel`` (linear attention, cross-attention to a Gemma-2
    encoder's sequence with its attention mask), a deep-compression ``AutoencoderDC`` (here 2x, 8 latent channels) and
    DPM-Solver++ on flow sigmas with shift 3, as the hub SANA pipelines are configured."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_t5_tokenizer(gemma=True)
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16, pad_token_id=0, bos_token_id=3, eos_token_id=1))
    vae = AutoencoderDC(in_channels=3, latent_channels=8, attention_head_dim=8,
                        encoder_block_types=("ResBlock",) * 3, decoder_block_types=("ResBlock",) * 3,
                        encoder_block_out_channels=(16, 32, 32), decoder_block_out_channels=(16, 32, 32),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
                        scaling_factor=0.41407)
    transformer = SanaTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                         cross_attention_dim=32, caption_channels=_TEXT_WIDTH, sample_size=8,
                                         patch_size=1)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, flow_shift=3.0, use_flow_sigmas=True,
                                            prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


# the words and punctuation of QwenImagePipeline's prompt template, lower-cased
_QWEN_TEMPLATE_WORDS = ("system", "describe", "the", "image", "by", "detailing", "color", ",", "shape", "size",
                        "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and",
                        "background", ":", "user", "assistant")


def build_qwen_tokenizer(words: tuple[str, ...] = PROMPT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level stand-in for Qwen2's tokenizer: no BOS / EOS added, ``<|im_start|>`` / ``<|im_end|>`` special,
    the newline a token of its own (then the pipeline's fixed template prefix is exactly its
    ``prompt_template_encode_start_idx`` = 34 tokens, as with the real tokenizer), punctuation split off."""
    from tokenizers import Regex, Tokenizer, normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers.models import WordLevel

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3, "\n": 4}
    for word in _QWEN_TEMPLATE_WORDS + tuple(words):
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre.Sequence([pre.Split(Regex(r"[ \t\r]+"), behavior="removed"),
                                      pre.Split("\n", behavior="isolated"), pre.Punctuation("isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32768, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _qwen() -> Any:
    """Qwen-Image's wiring (``QwenImagePipeline``): a ``QwenImageTransformer2DModel`` (2x2-packed latents, the text
    sequence with its attention mask), a Qwen2.5-VL text encoder (the class always builds its vision tower, here a
    tiny one the pipeline never runs), the 16-channel ``AutoencoderKLQwenImage`` (5-D, one frame, per-channel latent
    mean / std) and Qwen-Image's dynamically shifted flow Euler scheduler. The VAE's config carries ``sample_size``
    16 (diffusers warns that the class ignores it) so the tiny samples 16 px images, not the pipeline's 1024."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=0, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=_TEXT_WIDTH,
                           patch_size=2, temporal_patch_size=2, spatial_merge_size=2, window_size=8,
                           fullatt_block_indexes=[0]))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    vae.register_to_config(sample_size=16)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=_TEXT_WIDTH, guidance_embeds=False,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                             tokenizer=tokenizer, transformer=transformer)


def tiny_flow_pipeline(kind: str) -> Any:
    """The tiny pipeline of ``kind`` (``sd3``, ``flux``, ``sana`` or ``qwen``); the caller seeds and forks the RNG."""
    if kind == "sd3":
        return _sd3()
    if kind == "flux":
        return _flux()
    if kind == "sana":
        return _sana()
    if kind == "qwen":
        return _qwen()
    raise ValueError(f"unknown tiny flow model kind {kind!r}; choose one of: {', '.join(FLOW_KINDS)}")


def _check() -> None:  # pragma: no cover (a manual smoke run: python -m distill_diffusion.tiny_flow)
    for kind in FLOW_KINDS:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            pipe = tiny_flow_pipeline(kind)
        extra = {"flux": {"height": 16, "width": 16}, "sana": {"height": 32, "width": 32},
                 "qwen": {"height": 16, "width": 16}}.get(kind, {})
        if kind == "sana":
            extra["use_resolution_binning"] = False
        out = pipe(["a handwritten digit seven"], num_inference_steps=2, output_type="np", **extra).images
        print(kind, out.shape)


if __name__ == "__main__":
    _check()
