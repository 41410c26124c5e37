"""Is the GAN head's logit the density ratio f-distill needs? Measured on the mixture, where both densities are known.

    python bench/density_ratio.py [--config configs/gmm_dmd2_fdistill.yaml] [--seed 0] [--t 0.05 0.1 0.2 0.4 0.7]
                                  [--out runs/bench_density_ratio] [key=value ...]

Trains the config (or reads back a finished run in --out), then compares the GAN head's logit with the true log r
at the noised student samples (`distill_diffusion.eval.density_ratio`: p_t analytic, q_t the student's own samples
noised exactly).

For each t (a fraction of T) it prints the correlation of the head's logit with the true log r at the noised student
samples, the slope of the logit regressed on log r (1: calibrated), and the mean true log r and mean logit of the
samples by nearest class: under-covered classes have log r > 0, and a head that sees it gives them the larger
forward-KL weight. Results go to docs/BENCHMARKS.md (the f-distill section).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from distill_diffusion.config import load_config
from distill_diffusion.eval.density_ratio import ratio_agreement
from distill_diffusion.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from known_answer import control_forward_kl, parse_with_overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gmm_dmd2_fdistill.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.7])
    ap.add_argument("--out", default="runs/bench_density_ratio")
    ap.add_argument("--f-weight-control", choices=["shuffled"], default=None,
                    help="forward KL's weight r shuffled across the batch (known_answer.py's control)")
    args = parse_with_overrides(ap)
    if args.f_weight_control is not None:
        control_forward_kl(args.f_weight_control)
    torch.set_num_threads(1)
    cfg = load_config(args.config, [*args.overrides, f"train.seed={args.seed}", "train.progress=false"])
    if cfg.model.teacher != "gmm":
        raise SystemExit(f"density_ratio.py needs the mixture teacher (model.teacher: gmm), got {cfg.model.teacher}")
    out = Path(args.out)
    trainer = Trainer(cfg, out / f"seed{args.seed}", resume=True)  # a finished run is read back, not trained again
    metrics = trainer.train()
    rows = ratio_agreement(trainer.models, args.t, cfg.train.eval_samples)
    shares = [round(metrics[f"share_{k}"], 3) for k in range(trainer.models.mixture.classes)]
    control = f", {args.f_weight_control}" if args.f_weight_control else ""
    print(f"{cfg.method} ({trainer.method.cfg.f_divergence}{control}), seed {args.seed}: ED "
          f"{metrics['energy_distance']:.4f}, std ratio {metrics['std_ratio']:.3f}, coverage "
          f"{metrics['coverage']:.3f}, shares {shares}, share error {metrics['share_error']:.3f}")
    print("| t / T | sigma / alpha | corr(logit, log r) | slope | std log r | std logit | "
          "per class: mean log r / mean logit (samples) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per = "; ".join(f"{k}: {v[0]:+.2f} / {v[1]:+.2f} ({v[2]})" for k, v in r["by_class"].items())
        print(f"| {r['t']} | {r['sigma_over_alpha']:.3f} | {r['corr']:.3f} | {r['slope']:.3f} | "
              f"{r['log_r_std']:.3f} | {r['logit_std']:.3f} | {per} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"density_ratio_seed{args.seed}.json").write_text(json.dumps({"metrics": metrics, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
