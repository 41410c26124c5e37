"""Decoupled guidance on the known-answer teacher: 4-step TDM students distilled from the mixture teacher guided at
w, with DMD2's shared noise level for the guidance term (`cfg_times: shared`) or Decoupled DMD's own level for it
(`decoupled`), each measured against the guided teacher's 50-step DDIM from fixed noise and labels (the guided ODE
has no closed form: its 50-step DDIM is the answer, as for the w-conditioned rows of
``tests/test_trajectory_known_answer.py``), with the measurement code of ``tests/test_score_known_answer.py``.
The variant ``flipped`` is the decoupled run with the guidance term's sign flipped (a falsification).

    python bench/decoupled.py [--seeds 0 1] [--w 2.0] [--variants shared decoupled flipped]
                              [--out runs/bench_decoupled] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import trainer_for  # noqa: E402
from test_score_known_answer import flipped_guidance, guided_student_metrics  # noqa: E402

from distill_diffusion.methods import METHODS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--w", type=float, default=2.0)
    ap.add_argument("--variants", nargs="+", default=["shared", "decoupled", "flipped"],
                    choices=["shared", "decoupled", "flipped"])
    ap.add_argument("--out", default="runs/bench_decoupled")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="further config overrides (train.steps=...)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    METHODS["tdm_flipped_guidance"] = flipped_guidance(METHODS["tdm"])
    for seed in args.seeds:
        for variant in args.variants:
            method = "tdm_flipped_guidance" if variant == "flipped" else None
            times, section = "shared" if variant == "shared" else "decoupled", method or "tdm"
            run = Path(args.out) / f"{variant}_{seed}"
            run.mkdir(parents=True, exist_ok=True)
            trainer = trainer_for(run, "tdm", method, f"{section}.teacher_cfg={args.w}",
                                  f"{section}.cfg_times={times}", f"train.seed={seed}", *args.overrides)
            row = {"variant": variant, "seed": seed, "w": args.w, **guided_student_metrics(trainer, args.w)}
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
