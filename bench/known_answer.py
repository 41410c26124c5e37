"""Known-answer benchmark: the mixture teacher's DDIM at several step counts vs distilled 1-step students.

    python bench/known_answer.py [--config configs/gmm_dmd2.yaml] [--seeds 0 1 2] [--out runs/bench_known_answer]
                                 [--sample-steps 2 4] [key=value ...]
                                 (key=value: config overrides, e.g. dmd2.gan_student_weight=1e-3)

``--sample-steps``: the same trained student also sampled at these step counts (its multistep sampler on the
process's trailing timesteps), as a consistency or flow-map student can be.

Prints a markdown table (energy distance, per-class std ratio, coverage on 4000 class-balanced samples against
fresh true samples) and writes it with the raw numbers to OUT/known_answer.json. Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from distill_diffusion.assembly import assemble
from distill_diffusion.config import load_config
from distill_diffusion.denoiser import Cond
from distill_diffusion.eval.mixture import mixture_metrics, per_step_metrics
from distill_diffusion.preview import student_samples
from distill_diffusion.sampling import ddim
from distill_diffusion.trainer import Trainer


def teacher_rows(cfg, n: int) -> list[dict]:
    models = assemble(cfg, train=False).models
    mixture, process = models.mixture, models.process
    labels = mixture.balanced_labels(n)
    cond = Cond(labels=labels)
    noise = torch.randn(n, mixture.dim, generator=torch.Generator().manual_seed(1234))
    true = mixture_metrics(mixture.sample(labels, torch.Generator().manual_seed(99)), labels, mixture)
    rows = [{"model": "true samples", "steps": "-", **true, "seconds": 0.0}]
    for steps in (1, 2, 4, 8, 50):
        t0 = time.time()
        with torch.no_grad():
            x = ddim(lambda x, t: models.teacher.x0(x, t, cond), noise, process.trailing_timesteps(steps), process)
        rows.append({"model": "teacher DDIM", "steps": steps, **mixture_metrics(x, labels, mixture),
                     "seconds": round(time.time() - t0, 2)})
    return rows


def control_forward_kl(kind: str) -> None:
    """Replace forward KL's weight h(r) = r for this process (docs/BENCHMARKS.md, f-distill's controls)."""
    from distill_diffusion.methods import score

    if kind == "flipped":
        score.F_WEIGHTS["forward_kl"] = lambda r: 1 / r
    else:
        gen = torch.Generator().manual_seed(0)
        score.F_WEIGHTS["forward_kl"] = lambda r: r[torch.randperm(len(r), generator=gen).to(r.device)]


def parse_with_overrides(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """``ap``'s options, and ``args.overrides``: every key=value word on the line, wherever it stands (`--seeds 0 1
    dmd2.f_divergence=js` would otherwise hand the override to --seeds as a seed)."""
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (before or after the options)")
    argv = sys.argv[1:]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = ap.parse_args([a for a in argv if a not in overrides])
    args.overrides = [*args.overrides, *overrides]
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gmm_dmd2.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench_known_answer")
    ap.add_argument("--sample-steps", type=int, nargs="*", default=[],
                    help="also sample each trained student at these step counts")
    ap.add_argument("--per-step", action="store_true",
                    help="also measure each step's output of a multi-step student (its x0 at every step)")
    ap.add_argument("--f-weight-control", choices=["flipped", "shuffled"], default=None,
                    help="f-distill controls: forward KL's weight h(r) = r replaced by 1 / r (the same as "
                         "dmd2.f_divergence=neyman), or by r shuffled across the batch (the same weights, not tied to "
                         "the samples)")
    args = parse_with_overrides(ap)
    if args.f_weight_control is not None:
        control_forward_kl(args.f_weight_control)
    torch.set_num_threads(1)  # tiny MLPs: one thread is faster than two on a 2-core machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, args.overrides)
    rows = teacher_rows(cfg, cfg.train.eval_samples)
    for seed in args.seeds:
        run_cfg = load_config(args.config, [*args.overrides, f"train.seed={seed}", "train.progress=false"])
        t0 = time.time()
        trainer = Trainer(run_cfg, out / f"{cfg.method}_seed{seed}")
        m = trainer.train()
        steps = len(run_cfg.model.timesteps)
        rows.append({"model": f"{cfg.method} student (seed {seed})", "steps": steps,
                     **{k: m[k] for k in ("energy_distance", "std_ratio", "coverage", "share_error") if k in m},
                     "seconds": round(time.time() - t0, 1)})
        student, mixture = trainer.models.student, trainer.models.mixture
        if args.per_step:
            for i, pm in enumerate(per_step_metrics(trainer.models, run_cfg.train.eval_samples)):
                rows.append({"model": f"{cfg.method} student (seed {seed}), output of step {i + 1}", "steps": steps,
                             **pm, "seconds": 0.0})
        for k in args.sample_steps:
            student.timesteps = trainer.models.process.trailing_timesteps(k)
            labels = mixture.balanced_labels(run_cfg.train.eval_samples)
            x = student_samples(trainer.models, Cond(labels=labels), len(labels))
            rows.append({"model": f"{cfg.method} student (seed {seed}), sampled at {k}", "steps": k,
                         **mixture_metrics(x, labels, mixture), "seconds": 0.0})
    shares = any("share_error" in r for r in rows)  # a mixture of unequal classes: each class's share of the samples
    lines = ["| model | steps | energy distance | std ratio | coverage |" + (" share error |" if shares else "")
             + " seconds |", "|---|---|---|---|---|" + ("---|" if shares else "") + "---|"]
    for r in rows:
        share = (f" {r['share_error']:.4f} |" if "share_error" in r else " - |") if shares else ""
        lines.append(f"| {r['model']} | {r['steps']} | {r['energy_distance']:.4f} | {r['std_ratio']:.3f} | "
                     f"{r['coverage']:.3f} |{share} {r['seconds']} |")
    table = "\n".join(lines)
    print(table)
    (out / "known_answer.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
