"""KID against the feature scale on the embedded digits teacher: the sweep's KID (cubic kernel on raw features) and
KID on features standardised by the reference's per-dimension mean and std, each with its spread over subsets.

    python bench/kid_scale.py [--n 500] [--steps 2 25] [--cfg 2]

Uses the sweep's own functions (generation with DDIM, the digits classifier's features, the digits reference).
Results: docs/BENCHMARKS.md, "KID on the digits features".
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from distill_diffusion import zoo
from distill_diffusion.eval.fid import FeatureStats, extract, feature_backend, fid_from_stats, kid
from distill_diffusion.eval.generate import EvalModel, generate
from distill_diffusion.eval.sweep import cached_stats, digit_prompts, reference_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, nargs="*", default=[2, 25])
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--subsets", type=int, default=100)
    args = ap.parse_args()
    feat = feature_backend(zoo.load("digits_classifier"))
    ref = cached_stats(reference_images("digits"), feat, None).features
    mu, sd = ref.mean(0), ref.std(0) + 1e-8
    prompts, seeds = digit_prompts(args.n), list(range(args.n))
    teacher = EvalModel("embedded:digits", pipeline=zoo.load("embedded:digits"))
    for steps in args.steps:
        images, _ = generate(teacher, prompts, seeds, steps, args.cfg, "ddim", 250, False)
        f = extract(images, feat)
        raw = kid(f, ref, subsets=args.subsets, subset_size=args.n)
        standardised = kid((f - mu) / sd, (ref - mu) / sd, subsets=args.subsets, subset_size=args.n)
        fid = fid_from_stats(FeatureStats.from_features(f), FeatureStats.from_features(ref))
        print(json.dumps({"steps": steps, "cfg": args.cfg, "n": args.n, "fid": round(fid, 3),
                          "kid": [round(v, 4) for v in raw], "kid_standardised": [round(v, 4) for v in standardised],
                          "feature_norm": round(float(np.linalg.norm(f, axis=1).mean()), 2), "dim": int(f.shape[1])}),
              flush=True)


if __name__ == "__main__":
    main()
