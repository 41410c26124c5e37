"""The FID-vs-NFE sweep: teachers at many NFEs with their solvers, with and without CFG; students at their own steps.

NFE counts network evaluations: with classifier-free guidance (scale > 1) every step costs two, so a teacher row at
NFE n runs n // 2 steps. Every row also records latency per image and throughput, measured in the same run, and, on
the digits teacher, prompt accuracy (share of images the digits classifier reads as the prompted digit).

Every row is measured in two feature spaces where the reference is a set of images: the primary one (the digits
classifier's for ``--ref digits``, Inception's otherwise) and pixel-space PCA of the reference (`PixelPCA`, trained on
nothing), each with FID, KID (on features standardised by the reference, with its spread over subsets) and
precision / recall; ``extra_features`` adds DINOv2 and / or CLIP spaces (`eval.backbones`, for image teachers where
their weights are at hand). One feature space is not enough to tell which of two models is better; `verdicts` says
in words where they disagree.

Writes ``sweep.json`` (all rows), ``sweep.md`` (the table) and ``fid_vs_nfe.png`` (log-x, one line per
model / solver / guidance; one panel per feature space) into the output directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill_diffusion import zoo
from distill_diffusion.data import image_files
from distill_diffusion.errors import ConfigError
from distill_diffusion.files import check_out_dir
from distill_diffusion.zoo.digits_data import PROMPTS, TEACHER_SIZE, digits_split, label_of_prompt

from .backbones import Backbone, parse_spec
from .fid import (
    FeatureStats,
    PixelPCA,
    cache_key,
    cached_stats,
    extract,
    feature_backend,
    fid_from_stats,
    kid,
    precision_recall,
)
from .generate import EvalModel, generate, load_model


def reference_images(ref: str) -> np.ndarray:
    """``digits`` (the embedded teacher's training split, rendered as its images) or a folder of same-size images."""
    if ref == "digits":
        x, _ = digits_split(TEACHER_SIZE)["train"]
        return (x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    folder = Path(ref)
    if not folder.is_dir():
        raise ConfigError(f"reference {ref!r} is neither 'digits', a folder of images nor a .npz of statistics")
    files = image_files(folder)
    if not files:
        raise ConfigError(f"reference folder {ref!r} holds no .png/.jpg/.webp images")
    images = []
    for f in files:
        try:
            images.append(np.asarray(Image.open(f).convert("RGB")))
        except OSError:
            raise ConfigError(f"reference image {str(f)!r} cannot be read") from None
    if len({im.shape for im in images}) != 1:
        raise ConfigError(f"reference images in {ref!r} differ in size; resize them to one size first")
    return np.stack(images)


def digit_prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def prompt_accuracy(images: np.ndarray, prompts: list[str], classifier: torch.nn.Module) -> float:
    want = torch.tensor([label_of_prompt(p) for p in prompts])
    return float((classifier.predict(torch.as_tensor(images)) == want).float().mean())


def _settings(model: EvalModel, nfes: list[int], solvers: list[str], teacher_cfgs: list[float]) -> list[tuple]:
    if model.is_student:
        return [("student", 1.0, model.student_steps, model.student_steps)]
    out = []
    for solver in solvers:
        for w in teacher_cfgs:
            per_step = 2 if w > 1 else 1
            for nfe in nfes:
                steps = nfe // per_step
                if steps >= 1 and (solver, w, steps) not in [(s, g, k) for s, g, k, _ in out]:
                    out.append((solver, w, steps, steps * per_step))
    return out


SECOND = "pca"  # the second feature space's key suffix in rows (fid_pca, precision_pca, ...)
SPACES = {"_pca": "pixel-PCA", "_dinov2": "DINOv2", "_clip": "CLIP"}  # every further space's suffix and name


def further_spaces(rows: list[dict]) -> list[str]:
    """The suffixes of the feature spaces beyond the primary one that ``rows`` were measured in, in a fixed order."""
    return [sfx for sfx in SPACES if any(f"fid{sfx}" in r for r in rows)]


def space_metrics(features: np.ndarray | torch.Tensor, reference: FeatureStats, suffix: str = "") -> dict:
    """FID, KID (standardised features: mean and its std over 20 subsets) and precision / recall of generated
    ``features`` against ``reference``, keys suffixed ``suffix``."""
    stats = FeatureStats.from_features(features)
    precision, recall = precision_recall(stats.features, reference.features)
    k, k_std = kid(stats.features, reference.features, subsets=20, subset_size=min(500, stats.n, reference.n),
                   standardise=True)
    return {f"fid{suffix}": fid_from_stats(stats, reference), f"kid{suffix}": k, f"kid_std{suffix}": k_std,
            f"precision{suffix}": precision, f"recall{suffix}": recall}


def run_sweep(models: list[str], ref: str, nfes: list[int], solvers: list[str], teacher_cfgs: list[float],
              num_samples: int, out_dir: str | Path, features: str = "auto", batch_size: int = 250,
              prompts: list[str] | None = None, cache_dir: str | Path | None = None,
              progress: bool = True, extra_features: list[str] | None = None) -> list[dict]:
    out_dir = Path(out_dir)
    digits = ref == "digits"
    # everything a user passed is checked before anything is computed or written
    if ref.endswith(".npz") and not Path(ref).is_file():
        raise ConfigError(f"reference statistics {ref!r} not found")
    images = None if ref.endswith(".npz") else reference_images(ref)
    if prompts is None and not digits:
        raise ConfigError("a sweep against a non-digits reference needs prompts (--prompts FILE)")
    check_out_dir(out_dir)
    if cache_dir is not None:
        check_out_dir(cache_dir, "--cache-dir")
    extra = [parse_spec(spec) for spec in extra_features or []]
    if extra and images is None:
        raise ConfigError("further feature spaces (dinov2, clip) need the reference images, not a .npz of statistics")
    if len({kind for kind, _ in extra}) != len(extra):
        raise ConfigError(f"each further feature space may be named once, got {extra_features}")
    classifier = zoo.load("digits_classifier") if digits else None
    backend = classifier if features == "auto" and digits else ("clean" if features == "auto" else features)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # feature networks run where the generator does
    feat = feature_backend(backend, device)
    if images is None:
        reference = FeatureStats.load(ref)
    else:
        key = cache_key(ref, backend, images.shape, hashlib.sha1(images.tobytes()).hexdigest())
        cache = None if cache_dir is None else Path(cache_dir) / f"ref_{key}.npz"
        reference = cached_stats(images, feat, cache)
    space = "digits classifier" if digits and features == "auto" else \
        backend if isinstance(backend, str) else type(backend).__name__  # the primary space's name
    spaces = {"": (feat, reference)}
    if images is not None:  # pixel PCA needs the reference images themselves (a .npz has only primary features)
        pca = PixelPCA(images)
        spaces["_" + SECOND] = (pca, FeatureStats.from_features(extract(images, pca)))
    for kind, name in extra:
        net = Backbone(f"{kind}:{name}").to(device)
        key = cache_key(ref, kind, net, images.shape, hashlib.sha1(images.tobytes()).hexdigest())
        stats = cached_stats(images, net, None if cache_dir is None else Path(cache_dir) / f"ref_{key}.npz")
        spaces["_" + kind] = (net, stats)
    out_dir.mkdir(parents=True, exist_ok=True)
    if prompts is None:
        prompts = digit_prompts(num_samples)
    prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
    seeds = list(range(num_samples))
    rows = []
    for spec in models:
        model = load_model(spec)
        for solver, w, steps, nfe in _settings(model, nfes, solvers, teacher_cfgs):
            images, seconds = generate(model, prompts, seeds, steps, w, solver, batch_size, progress)
            row = {"model": spec, "solver": solver, "guidance": w, "steps": steps, "nfe": nfe, "n": num_samples,
                   "space": space}
            for suffix, (fn, ref_stats) in spaces.items():
                row.update(space_metrics(extract(images, fn), ref_stats, suffix))
            row.update({"ms_per_image": 1000 * seconds / num_samples, "images_per_s": num_samples / seconds,
                        "batch_size": batch_size})
            if classifier is not None:
                row["prompt_accuracy"] = prompt_accuracy(images, prompts, classifier)
            rows.append(row)
            if progress:
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    write_outputs(rows, out_dir, reference_n=reference.n)
    return rows


def table(rows: list[dict]) -> str:
    acc = any("prompt_accuracy" in r for r in rows)
    further = further_spaces(rows)
    head = "| model | solver | CFG | steps | NFE | FID | KID (std) | precision | recall | "
    head += "".join(f"FID {sfx[1:]} | precision {sfx[1:]} | recall {sfx[1:]} | " for sfx in further)
    head += "prompt acc. | " if acc else ""
    head += "ms / image | images / s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    nan = float("nan")
    for r in rows:
        cells = [Path(r["model"]).name or r["model"], r["solver"], f"{r['guidance']:g}", str(r["steps"]),
                 str(r["nfe"]), f"{r['fid']:.3f}", f"{r['kid']:.4f} ({r.get('kid_std', nan):.4f})",
                 f"{r.get('precision', nan):.3f}", f"{r.get('recall', nan):.3f}"]
        for sfx in further:
            cells += [f"{r.get(f'{k}{sfx}', nan):.3f}" for k in ("fid", "precision", "recall")]
        if acc:
            cells.append(f"{r.get('prompt_accuracy', nan):.3f}")
        cells += [f"{r['ms_per_image']:.2f}", f"{r['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label(r: dict) -> str:
    return f"{Path(r['model']).name or r['model']} ({r['solver']}, CFG {r['guidance']:g}, {r['steps']} steps, " \
           f"NFE {r['nfe']})"


def verdicts(a: dict, b: dict) -> list[str]:
    """Which of rows ``a`` and ``b`` each feature space finds better (lower FID), and whether they agree."""
    names = {"": f"{a.get('space', 'primary')} FID", **{sfx: f"{name} FID" for sfx, name in SPACES.items()}}
    better = {sfx: a[f"fid{sfx}"] < b[f"fid{sfx}"] for sfx in names if f"fid{sfx}" in a and f"fid{sfx}" in b}
    parts = [f"{names[sfx]} {a[f'fid{sfx}']:.3f} vs {b[f'fid{sfx}']:.3f}" for sfx in better]
    if len(set(better.values())) == 1:
        who = label(a) if next(iter(better.values())) else label(b)
        return [f"{who} is better in every feature space ({'; '.join(parts)})."]
    return [f"The feature spaces disagree about {label(a)} against {label(b)}: " + "; ".join(
        f"{p} ({'first' if better[sfx] else 'second'} better)" for p, sfx in zip(parts, better)) + "."]


def write_outputs(rows: list[dict], out_dir: Path, reference_n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "sweep.json").write_text(json.dumps({"reference_n": reference_n, "rows": rows}, indent=1))
    (out_dir / "sweep.md").write_text(table(rows) + "\n")
    suffixes = [""] + further_spaces(rows)
    fig, axes = plt.subplots(1, len(suffixes), figsize=(6 * len(suffixes), 4), dpi=120, squeeze=False)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((Path(r["model"]).name or r["model"], r["solver"], r["guidance"]), []).append(r)
    for ax, sfx in zip(axes[0], suffixes):
        for (model, solver, w), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["nfe"])
            style = "o" if solver == "student" else ".-"
            ax.plot([r["nfe"] for r in rs], [r[f"fid{sfx}"] for r in rs], style, label=f"{model} {solver} CFG {w:g}")
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(f"FID, {SPACES[sfx]}" if sfx else "FID")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "fid_vs_nfe.png")
    plt.close(fig)
