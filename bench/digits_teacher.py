"""Quality of the embedded digits teacher: real-vs-real floor, CFG scan at 50 DDIM steps, classifier accuracy.

    python bench/digits_teacher.py [--model embedded:digits] [--n 359] [--guidance 1,1.5,2,3,4,5]

FID is in the digits classifier's 128-d feature space against the teacher's training split (1437 images). The
floor is the held-out split (359 real images the teacher never saw) against the same reference, so generated sets
are compared at that same sample size n = 359 (FID is biased upward at small n; equal n makes the ratio fair).
Prints a markdown table; results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill_diffusion import zoo
from distill_diffusion.eval.fid import FeatureStats, extract, feature_backend, fid_from_stats
from distill_diffusion.eval.generate import generate, load_model
from distill_diffusion.eval.sweep import digit_prompts, prompt_accuracy, reference_images
from distill_diffusion.zoo.digits_data import TEACHER_SIZE, digits_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:digits")
    ap.add_argument("--n", type=int, default=359)
    ap.add_argument("--guidance", default="1,1.5,2,3,4,5")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    clf = zoo.load("digits_classifier")
    feat = feature_backend(clf)
    ref = FeatureStats.from_features(extract(reference_images("digits"), feat))
    x, y = digits_split(TEACHER_SIZE)["test"]
    held = (x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    floor = fid_from_stats(FeatureStats.from_features(extract(held, feat)), ref)
    acc_real = float((clf.predict(torch.as_tensor(held)) == y).float().mean())
    print(f"reference: {ref.n} training images; held-out real vs reference at n={len(held)}: FID {floor:.3f}, "
          f"classifier accuracy {acc_real:.3f}")
    model = load_model(args.model)
    prompts = digit_prompts(args.n)
    print("| CFG | steps | FID | FID / floor | prompt accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for w in [float(v) for v in args.guidance.split(",")]:
        t0 = time.time()
        images, _ = generate(model, prompts, list(range(args.n)), args.steps, w, "ddim", progress=False)
        f = fid_from_stats(FeatureStats.from_features(extract(images, feat)), ref)
        acc = prompt_accuracy(images, prompts, clf)
        print(f"| {w:g} | {args.steps} | {f:.3f} | {f / floor:.2f} | {acc:.3f} | {time.time() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
