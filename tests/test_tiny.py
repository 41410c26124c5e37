"""Tests for distill_diffusion.tiny: offline tiny Stable Diffusion (UNet) and SD3 / Flux (flow-matching transformer)
pipelines (CPU, a few seconds)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from distill_diffusion.tiny import PROMPT_WORDS, TINY_KINDS, build_tokenizer, tiny_pipeline

PROMPT = "a handwritten digit seven"


UNET_KINDS = ("sd15", "sd21", "sdxl")


def _generate(pipe: DiffusionPipeline) -> np.ndarray:
    size = {"SanaPipeline": {"height": 32, "width": 32, "use_resolution_binning": False}}
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
               **size.get(type(pipe).__name__, {"height": 16, "width": 16}))
    return np.asarray(out.images)


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every weight of every model in the pipeline, keyed by component and parameter name."""
    return {
        f"{name}.{key}": value
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
        for key, value in component.state_dict().items()
    }


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: patch the constant too so any HTTP request would fail
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_build_generate_save_reload(kind: str, tmp_path: Path, offline: None) -> None:
    pipe = tiny_pipeline(kind)
    image = _generate(pipe)
    assert image.shape == ((1, 32, 32, 3) if kind == "sana" else (1, 16, 16, 3))
    assert np.isfinite(image).all()

    pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded) is type(pipe)
    original, again = _state(pipe), _state(reloaded)
    assert original.keys() == again.keys()
    for key, value in original.items():
        assert torch.equal(value, again[key]), key
    assert np.abs(_generate(reloaded) - image).max() < 1e-5


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_shapes_and_configs(kind: str) -> None:
    pipe = tiny_pipeline(kind)
    unet, vae, scheduler = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    assert tuple(unet.block_out_channels) == (32, 64) and unet.layers_per_block == 1
    assert unet.sample_size == 8 and unet.in_channels == unet.out_channels == 4
    assert tuple(vae.block_out_channels) == (32, 64) and vae.latent_channels == 4
    assert pipe.vae_scale_factor == 2
    assert scheduler.num_train_timesteps == 1000 and scheduler.beta_schedule == "scaled_linear"
    assert (scheduler.beta_start, scheduler.beta_end) == (0.00085, 0.012)
    assert scheduler.steps_offset == 1 and scheduler.clip_sample is False and scheduler.set_alpha_to_one is False
    assert scheduler.prediction_type == ("v_prediction" if kind == "sd21" else "epsilon")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder.config
    assert encoder.hidden_size == 32 and encoder.num_hidden_layers == 2
    assert (encoder.bos_token_id, encoder.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert encoder.pad_token_id == tokenizer.pad_token_id
    if kind == "sdxl":
        assert isinstance(pipe, StableDiffusionXLPipeline)
        assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
        assert unet.addition_embed_type == "text_time"
        projection_dim = pipe.text_encoder_2.config.projection_dim
        assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + projection_dim
        assert unet.cross_attention_dim == encoder.hidden_size + pipe.text_encoder_2.config.hidden_size
    else:
        assert isinstance(pipe, StableDiffusionPipeline)
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        assert unet.cross_attention_dim == encoder.hidden_size
        assert unet.use_linear_projection is (kind == "sd21")


def test_flow_pipelines_shapes_and_configs() -> None:
    """tiny:sd3 and tiny:flux: 16x16 images from 8x8x16 latents (SD3's latent scaling and shift), the hub
    pipelines' component classes, flow-matching schedulers (SD3's shift 3, Flux's resolution-dependent shift), a
    word-level T5 tokenizer that appends </s> like T5's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    sd3, flux = tiny_pipeline("sd3"), tiny_pipeline("flux")
    assert isinstance(sd3, StableDiffusion3Pipeline) and isinstance(flux, FluxPipeline)
    for pipe in (sd3, flux):
        assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
        assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 2
        assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert sd3.scheduler.config.shift == 3.0 and not sd3.scheduler.config.use_dynamic_shifting
    assert flux.scheduler.config.use_dynamic_shifting and flux.transformer.config.guidance_embeds
    assert sd3.transformer.config.sample_size == 8 and sd3.transformer.config.in_channels == 16
    assert flux.transformer.config.in_channels == 64  # 16 channels x 2x2 packing
    t5 = sd3.tokenizer_3
    ids = t5(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 1 and ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    assert t5("XYLOPHONE").input_ids == [t5.unk_token_id, t5.eos_token_id]
    sana = tiny_pipeline("sana")
    assert sana.vae_scale_factor == 4 and sana.vae.config.latent_channels == 8
    assert sana.scheduler.config.use_flow_sigmas and sana.scheduler.config.flow_shift == 3.0
    gemma = sana.tokenizer
    assert gemma(PROMPT).input_ids[0] == gemma.bos_token_id and gemma.unk_token_id not in gemma(PROMPT).input_ids


def test_prompt_words_are_single_tokens() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.model_max_length == 16
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens([bos, eos]) == ["<|startoftext|>", "<|endoftext|>"]
    required = {"a", "handwritten", "digit", "photo", "of", "cat", "dog", "red", "blue", "green", "car", "tree"}
    required |= {"house", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    assert required <= set(PROMPT_WORDS)
    for word in PROMPT_WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3 and ids[0] == bos and ids[-1] == eos, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer(word.upper()).input_ids == ids  # lower-cased like CLIP
    vocab = tokenizer.get_vocab()
    assert sum(len(token) == 1 for token in vocab) == 256 and sum(token.endswith("</w>") for token in vocab) >= 256
    # an unknown word still tokenizes, into several known (byte-level) pieces, none of them the unknown token
    ids = tokenizer("xylophone!").input_ids
    assert len(ids) > 4 and eos not in ids[1:-1]
    word_ids = [vocab[word + "</w>"] for word in PROMPT.split()]
    assert tokenizer(PROMPT, padding="max_length").input_ids == [bos, *word_ids] + [eos] * (16 - 1 - len(word_ids))


def test_custom_words_and_length() -> None:
    tokenizer = build_tokenizer(["Zebra", "at", "cat"], max_length=8)
    assert tokenizer.model_max_length == 8
    for word in ("zebra", "at", "cat"):
        assert len(tokenizer(word).input_ids) == 3
    with pytest.raises(ValueError, match="letters"):
        build_tokenizer(["sd15"])


def test_seed_determinism_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = _state(tiny_pipeline("sd15", seed=0))
    assert torch.equal(torch.rand(3), expected)  # building does not consume the caller's random numbers
    second = _state(tiny_pipeline("sd15", seed=0))
    other = _state(tiny_pipeline("sd15", seed=1))
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(value, second[key]) for key, value in first.items())
    assert not torch.equal(first["unet.conv_in.weight"], other["unet.conv_in.weight"])
    (embedding,) = [key for key in first if key.startswith("text_encoder.") and key.endswith("token_embedding.weight")]
    assert not torch.equal(first[embedding], other[embedding])


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="sd15") as info:
        tiny_pipeline("sd4")
    assert str(info.value) == "unknown tiny model kind 'sd4'; choose one of: sd15, sd21, sdxl, sd3, flux, sana, qwen"


def test_new_unet_inputs_take_on_a_config_that_does_not_state_them() -> None:
    """A UNet whose config.json never stated ``time_cond_proj_dim`` or ``class_embed_type`` (SD 1.5's hub config,
    written by diffusers 0.6; the in-memory tiny UNet lists them in ``_use_default_values`` alike) still gets a
    CFG-scale embedding and a second time input: diffusers' ``from_config`` would drop both changes silently."""
    from distill_diffusion.factory import with_cfg_embedding
    from distill_diffusion.teachers import load_pipeline
    from distill_diffusion.two_time import with_end_time

    unet = load_pipeline("tiny:sd15").unet
    assert {"time_cond_proj_dim", "class_embed_type"} <= set(unet.config["_use_default_values"])
    assert with_cfg_embedding(unet, 8).config.time_cond_proj_dim == 8
    assert with_end_time(unet).config.class_embed_type == "timestep"
