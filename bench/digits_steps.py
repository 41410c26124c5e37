"""Each step of a multi-step digits student, measured: the classifier-space FID of the x0 it predicts at every step of
its re-noising sampler (the same noise and prompts as `distill-diffusion eval sweep --ref digits`, so the last step's
FID is the sweep's 4-step student row), that FID's mean term |mu - mu_ref|^2, prompt accuracy, the images' mean
pixel value against the reference's, and the last step's FID per class (100 images a class at n = 1000: noisy, for
finding the class at fault, not for ranking).

    python bench/digits_steps.py RUN_DIR [RUN_DIR ...] [--num-samples 1000] [--out FILE.json]
        [--continuation N [--continuation-cfg W]]

``--continuation N``: for each step k >= 2, step k-1's output re-noised to t_k (fixed draws) is handed both to the
student's step k and to the guided teacher's DDIM in N uniform steps from t_k (CFG W, default 2): where the teacher
continues the student's own trajectory better than the student does, step k is what loses quality (the diagnostic
behind ``ode_weight``, docs/methods.md).

A trajectory-aware student (TDM) should give data at every step; where the last step is worse than the one before,
the final step is what a recipe should fix. Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from distill_diffusion import zoo
from distill_diffusion.eval.fid import FeatureStats, extract, feature_backend, frechet_distance
from distill_diffusion.eval.generate import load_model
from distill_diffusion.eval.sweep import digit_prompts, reference_images
from distill_diffusion.latents import decode
from distill_diffusion.sampling import ddim, timestep_batch
from distill_diffusion.zoo.digits_data import TEACHER_SIZE, digits_split, label_of_prompt


def distances(features: np.ndarray, ref: FeatureStats) -> tuple[float, float]:
    """(FID, its mean term) of ``features`` against ``ref``."""
    s = FeatureStats.from_features(features)
    return frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma), float(((s.mu - ref.mu) ** 2).sum())


def step_rows(run: str, n: int, feat, ref_features: np.ndarray, ref_labels: np.ndarray,  # noqa: ANN001
              ref_mean: float) -> list[dict]:
    models = load_model(run).run.models
    student = models.student
    prompts = digit_prompts(n)
    labels = np.array([label_of_prompt(p) for p in prompts])
    with torch.no_grad():
        cond = models.text.encode(prompts)
        gens = [torch.Generator().manual_seed(k) for k in range(n)]  # per-image seeds, as `eval.generate`
        noise = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in gens])
        outputs = student.step_outputs(noise, cond, gens)
    ref = FeatureStats.from_features(ref_features)
    classifier = zoo.load("digits_classifier")
    rows = []
    for k, x0 in enumerate(outputs):
        images = decode(models, x0)
        f = extract(images, feat).double().numpy()
        fid, mean_term = distances(f, ref)
        predicted = classifier.predict(torch.as_tensor(images)).numpy()
        row = {"run": run, "step": k + 1, "t": float(student.timesteps[k]), "fid": fid, "mean_term": mean_term,
               "prompt_accuracy": float((predicted == labels).mean()), "mean_pixel": float(images.mean() / 255),
               "reference_mean_pixel": ref_mean}
        if k == len(outputs) - 1:
            per_class = [FeatureStats.from_features(ref_features[ref_labels == c]) for c in range(10)]
            row["fid_per_class"] = [distances(f[labels == c], per_class[c])[0] for c in range(10)]
        rows.append(row)
    return rows


def continuation_rows(run: str, n: int, feat, ref: FeatureStats, steps: int, w: float) -> list[dict]:  # noqa: ANN001
    """From each step's own input (the previous output re-noised, seeded draws): the student's step and the guided
    teacher's DDIM-``steps`` continuation, each as (FID, mean pixel)."""
    models = load_model(run).run.models
    student, process = models.student, models.process
    prompts = digit_prompts(n)
    rows = []
    with torch.no_grad():
        cond = models.text.encode(prompts)
        gens = [torch.Generator().manual_seed(k) for k in range(n)]
        noise = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in gens])
        outputs = student.step_outputs(noise, cond, gens)
        draws = torch.Generator().manual_seed(123)
        for k in range(1, len(outputs)):
            t0 = student.timesteps[k]
            t = torch.full((n,), t0)
            x = process.add_noise(outputs[k - 1], torch.randn(outputs[k - 1].shape, generator=draws), t)
            grid = [t0 * (1 - j / steps) for j in range(steps)]
            grid = [round(v) for v in grid] if float(t0) == int(t0) else grid
            ends = {"student": student(x, timestep_batch(t0, x), cond),
                    f"teacher DDIM-{steps}, CFG {w:g}": ddim(lambda z, tt: models.teacher.x0(z, tt, cond, w), x,
                                                               grid, process)}
            for who, x0 in ends.items():
                images = decode(models, x0)
                fid, _ = distances(extract(images, feat).double().numpy(), ref)
                rows.append({"run": run, "step": k + 1, "t": float(t0), "who": who, "fid": fid,
                             "mean_pixel": float(images.mean() / 255)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run directories of multi-step digits students")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows here as JSON")
    ap.add_argument("--continuation", type=int, default=0, metavar="N",
                    help="also continue each step's input with the guided teacher's DDIM in N steps")
    ap.add_argument("--continuation-cfg", type=float, default=2.0, metavar="W")
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = reference_images("digits")
    _, ref_labels = digits_split(TEACHER_SIZE)["train"]
    feat = feature_backend(zoo.load("digits_classifier"), "cpu")
    ref_features = extract(images, feat).double().numpy()
    rows = []
    print("| run | step | t | FID | mean term | prompt acc. | mean pixel (ref) |")
    print("|---|---|---|---|---|---|---|")
    ref_mean = float(images.mean() / 255)
    for run in args.runs:
        for r in step_rows(run, args.num_samples, feat, ref_features, np.asarray(ref_labels), ref_mean):
            rows.append(r)
            print(f"| {Path(run).name} | {r['step']} | {r['t']:g} | {r['fid']:.2f} | {r['mean_term']:.2f} | "
                  f"{r['prompt_accuracy']:.3f} | {r['mean_pixel']:.4f} ({ref_mean:.4f}) |", flush=True)
        print(f"<!-- {Path(run).name} last step, FID per class 0-9: "
              f"{' '.join(f'{v:.1f}' for v in rows[-1]['fid_per_class'])} -->", flush=True)
        if args.continuation:
            ref = FeatureStats.from_features(ref_features)
            for r in continuation_rows(run, args.num_samples, feat, ref, args.continuation, args.continuation_cfg):
                rows.append(r)
                print(f"| {Path(run).name} | step {r['step']}'s input (t = {r['t']:g}) | {r['who']} | {r['fid']:.2f} "
                      f"| {r['mean_pixel']:.4f} |", flush=True)
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
