"""The embedded models, shipped as package data so every method, export and sweep runs offline on a laptop CPU.

- ``digits``: a Stable-Diffusion-shaped text-to-image pipeline trained on scikit-learn's handwritten digits
  (`train_digits.py`; re-create with ``distill-diffusion zoo train-digits OUT_DIR``);
- ``digits-flow``: the same task in Stable Diffusion 3's shape (an ``SD3Transformer2DModel`` trained with the
  flow-matching objective, `train_digits_flow.py`; ``distill-diffusion zoo train-digits-flow OUT_DIR``);
- ``digits_classifier``: the classifier that gives the digits FID feature space and prompt accuracy
  (`classifier.py`; re-create with ``distill-diffusion zoo train-classifier OUT``).

``load("digits")`` returns the diffusers pipeline; ``embedded:digits`` (``embedded:digits-flow``) names it anywhere a
teacher path is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .classifier import load_classifier

WEIGHTS = Path(__file__).resolve().parent / "weights"
EMBEDDED = {"digits": WEIGHTS / "digits", "digits-flow": WEIGHTS / "digits_flow",
            "digits_classifier": WEIGHTS / "digits_classifier.safetensors"}
PREFIX = "embedded:"
# the digits teacher's best CFG scale at 50 DDIM steps (lowest digits-FID 5.26, prompt accuracy 0.997;
# `python bench/digits_teacher.py`, docs/BENCHMARKS.md)
DIGITS_BEST_GUIDANCE = 2.0
# the flow teacher's: the CFG scale at 50 Euler steps that meets both floors (FID 5.55 = 1.13x the real-vs-real 4.90,
# prompt accuracy 0.967; CFG 1.2 scores FID 4.60 at accuracy 0.947; docs/BENCHMARKS.md, "The embedded flow teacher")
DIGITS_FLOW_BEST_GUIDANCE = 1.3


def path(name: str) -> Path:
    name = name.removeprefix(PREFIX)
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; choose one of: {', '.join(EMBEDDED)}")
    p = EMBEDDED[name]
    if not p.exists():
        raise ValueError(f"embedded model {name!r} is missing from this installation ({p}); re-create it with "
                         "`distill-diffusion zoo train-digits` / `zoo train-classifier`")
    return p


def load(name: str) -> Any:
    """``digits`` -> StableDiffusionPipeline, ``digits-flow`` -> StableDiffusion3Pipeline; ``digits_classifier`` ->
    DigitsClassifier (all offline)."""
    name = name.removeprefix(PREFIX)
    if name == "digits_classifier":
        return load_classifier(path(name))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path(name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
