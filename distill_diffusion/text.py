"""Prompt -> `Cond`, exactly as diffusers' SD, SDXL, SD3 and Flux pipelines encode prompts (so exports reproduce
training).

SD 1.x / 2.x: the text encoder's last hidden state; the unconditional branch encodes the empty prompt.
SDXL: the penultimate hidden states of both encoders concatenated, pooled ``text_embeds`` from the second encoder, and
``time_ids = (H, W, 0, 0, H, W)``; with ``force_zeros_for_empty_prompt`` the unconditional embeddings are zeros.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .denoiser import Cond


class TextConditioner:
    def __init__(self, tokenizers: list[Any], encoders: list[Any], sdxl: bool = False,
                 force_zeros_for_empty_prompt: bool = True, image_size: tuple[int, int] = (1024, 1024)):
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.sdxl = sdxl
        self.force_zeros = force_zeros_for_empty_prompt
        self.image_size = image_size
        self._null: tuple[Tensor, Tensor | None] | None = None

    def _ids(self, tokenizer: Any, prompts: list[str], device: torch.device) -> Tensor:
        out = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return out.input_ids.to(device)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        if not self.sdxl:
            enc = self.encoders[0]
            return enc(self._ids(self.tokenizers[0], prompts, enc.device))[0], None
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            out = enc(self._ids(tok, prompts, enc.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def null(self) -> tuple[Tensor, Tensor | None]:
        """The empty prompt's (embeds, pooled), (1, ...) each: computed once (the encoders are frozen)."""
        if self._null is None:
            self._null = self._encode([""])
        return self._null

    def encode(self, prompts: list[str]) -> Cond:
        """Conditioning for ``prompts`` with the empty-prompt unconditional branch, batch-aligned."""
        return self.cond(*self._encode(list(prompts)))

    def cond(self, embeds: Tensor, pooled: Tensor | None) -> Cond:
        """`Cond` from encoder outputs (fresh, or rows of a prompt cache), with the unconditional branch."""
        n = len(embeds)
        if not self.sdxl:
            null, _ = self.null()
            return Cond(embeds=embeds, uncond=Cond(embeds=null.to(embeds).expand(n, -1, -1).clone()))
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=embeds.dtype, device=embeds.device).repeat(n, 1)
        if self.force_zeros:
            null, null_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            null, null_pooled = self.null()
            null, null_pooled = null.to(embeds).expand(n, -1, -1).clone(), null_pooled.to(pooled).expand(n, -1).clone()
        uncond = Cond(embeds=null, pooled=null_pooled, time_ids=time_ids.clone())
        return Cond(embeds=embeds, pooled=pooled, time_ids=time_ids, uncond=uncond)


class PipelineTextConditioner(TextConditioner):
    """Prompt -> `Cond` for the flow-matching transformer pipelines, through the pipeline's own ``encode_prompt``
    at its defaults (so an export, called with the same defaults, conditions exactly as training did).

    SD3 / SD3.5: ``embeds`` the CLIP-L + CLIP-G hidden states (padded to T5's width) followed by T5's, ``pooled``
    the two CLIP pooled projections; the unconditional branch encodes the empty prompt, as the pipeline's CFG does.
    Flux.1: ``embeds`` T5's hidden states, ``pooled`` CLIP's pooled output, and ``guidance`` the distilled guidance
    value (Flux.1-dev's ``guidance_scale``; ``None`` for a transformer without a guidance embedding, schnell).
    SANA: ``embeds`` Gemma-2's hidden states of the prompt behind the pipeline's default instruction prefix
    (``complex_human_instruction``, as ``SanaPipeline.__call__`` adds it), ``mask`` their attention mask; the
    unconditional branch is the pipeline's negative (the empty prompt, no prefix). Qwen-Image: ``embeds`` the
    Qwen2.5-VL hidden states after the chat template (the pipeline's own ``encode_prompt``), padded to a fixed length
    with their ``mask``; the unconditional branch the negative prompt " " its docs use for true CFG.
    `TextConditioner` gives ``encode`` and the cached empty prompt; the encoding and the `Cond` layout are the
    pipeline's.
    """

    def __init__(self, pipe: Any, guidance: float | None = None):
        names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
        super().__init__([getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names],
                         [getattr(pipe, n) for n in names])
        self.pipe = pipe
        self.guidance = guidance

    @property
    def _sana(self) -> bool:
        return type(self.pipe).__name__ == "SanaPipeline"

    @property
    def _masked(self) -> bool:
        """SANA and Qwen-Image: no pooled embedding, an attention mask instead (it rides in the pooled slot)."""
        return self._sana or type(self.pipe).__name__ == "QwenImagePipeline"

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        device = self.encoders[0].device
        if self._sana:  # SANA has no pooled embedding: its attention mask rides in that slot (and in prompt caches)
            embeds, mask, _, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                         complex_human_instruction=_sana_instruction())
            return embeds, mask.float()
        if type(self.pipe).__name__ == "FluxPipeline":
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device)
            return embeds, pooled
        if type(self.pipe).__name__ == "QwenImagePipeline":
            return _qwen_fixed_length(*self.pipe.encode_prompt(prompts, device=device))
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                       do_classifier_free_guidance=False)
        return embeds, pooled

    def null(self) -> tuple[Tensor, Tensor | None]:
        if self._null is None and self._sana:  # the pipeline's own negative: "" without the instruction prefix
            _, _, embeds, mask = self.pipe.encode_prompt([""], negative_prompt="", device=self.encoders[0].device,
                                                         complex_human_instruction=_sana_instruction())
            self._null = embeds, mask.float()
        if self._null is None and type(self.pipe).__name__ == "QwenImagePipeline":  # the documented negative " "
            self._null = self._encode([" "])
        return super().null()

    def cond(self, embeds: Tensor, pooled: Tensor | None) -> Cond:
        n = len(embeds)
        null, null_pooled = self.null()
        if self._masked:
            uncond = Cond(embeds=null.to(embeds).expand(n, -1, -1).clone(), mask=null_pooled.to(pooled).expand(n, -1)
                          .clone())
            return Cond(embeds=embeds, mask=pooled, uncond=uncond)
        guidance = None if self.guidance is None else torch.full((n,), float(self.guidance), device=embeds.device)
        uncond = Cond(embeds=null.to(embeds).expand(n, -1, -1).clone(), pooled=null_pooled.to(pooled).expand(n, -1)
                      .clone(), guidance=None if guidance is None else guidance.clone())
        return Cond(embeds=embeds, pooled=pooled, guidance=guidance, uncond=uncond)


QWEN_TEXT_LENGTH = 512  # QwenImagePipeline's max_sequence_length: every prompt an export accepts fits


def _qwen_fixed_length(embeds: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Qwen-Image's prompt embeddings come padded to the longest prompt of the batch (with no mask when none is
    padded); here every batch is zero-padded to `QWEN_TEXT_LENGTH` with its mask, so batches, the empty prompt and
    prompt caches share one shape. The transformer reads the mask, so padding changes no output beyond rounding (the
    export pads to its batch's longest prompt and reproduces training within 1e-4: tests/test_export_flow.py)."""
    n, length, width = embeds.shape
    if mask is None:
        mask = torch.ones(n, length, dtype=torch.long, device=embeds.device)
    pad = QWEN_TEXT_LENGTH - length
    embeds = torch.cat([embeds, embeds.new_zeros(n, pad, width)], 1)
    return embeds, torch.cat([mask, mask.new_zeros(n, pad)], 1).float()


def _sana_instruction() -> list[str]:
    """``SanaPipeline.__call__``'s default ``complex_human_instruction``: what an export called with defaults uses."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)
