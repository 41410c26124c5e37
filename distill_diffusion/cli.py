"""``distill-diffusion``: the command line.

    distill-diffusion distill CONFIG [--out DIR] [--resume] [key=value ...]
    distill-diffusion sample RUN_DIR --out DIR [--prompt TEXT ...] [--num-per-prompt N] [--num-samples N] [--seed S]

Errors are one line naming what was wrong and what is allowed; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .config import ConfigError


def _distill(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    metrics = Trainer(cfg, out, resume=args.resume).train()
    print(json.dumps({"run": str(out), **metrics}))


def _sample(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from .denoiser import Cond
    from .eval.mixture import mixture_metrics
    from .preview import PREVIEW_SEED, decode, scatter, student_samples
    from .trainer import load_student

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} is not empty; choose another --out")
    cfg, models = load_student(args.run_dir)
    seed = PREVIEW_SEED if args.seed is None else args.seed
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if models.family == "gmm":
        if args.prompt:
            raise ConfigError("a mixture run takes no --prompt; use --num-samples")
        labels = models.mixture.balanced_labels(args.num_samples)
        x = student_samples(models, Cond(labels=labels), len(labels), seed)
        metrics = mixture_metrics(x, labels, models.mixture)
        save_file({"samples": x.contiguous(), "labels": labels}, str(tmp / "samples.safetensors"))
        scatter(x, labels, tmp / "samples.png", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(json.dumps(metrics))
    else:
        from PIL import Image

        prompts = args.prompt or cfg.data.prompts
        lines = []
        for i, prompt in enumerate(prompts):
            for j in range(args.num_per_prompt):
                s = seed + j
                latents = student_samples(models, models.text.encode([prompt]), 1, s)
                name = f"{i:04d}_{j:03d}.png"
                Image.fromarray(decode(models, latents)[0]).save(tmp / name)
                lines.append(json.dumps({"file": name, "prompt": prompt, "seed": s,
                                         "steps": len(models.student.timesteps), "guidance": 1.0,
                                         "timesteps": models.student.timesteps}))
        (tmp / "samples.jsonl").write_text("\n".join(lines) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"wrote {out}")


def _zoo_train_digits(args: argparse.Namespace) -> None:
    from .zoo.train_digits import train_digits

    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --overwrite or choose another")
    print(json.dumps(train_digits(out, vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed)))


def _zoo_train_classifier(args: argparse.Namespace) -> None:
    from .zoo.classifier import train_classifier

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite or choose another path")
    _, stats = train_classifier(out, seed=args.seed)
    print(json.dumps(stats))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-diffusion", description="Few-step diffusion distillation.")
    sub = parser.add_subparsers(dest="command", metavar="{distill,sample,zoo}")
    sub.required = True
    d = sub.add_parser("distill", help="train a few-step student from a YAML config")
    d.add_argument("config", help="experiment YAML, e.g. configs/gmm_dmd2.yaml")
    d.add_argument("--out", help="run directory (default: runs/<config name>)")
    d.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")
    d.set_defaults(func=_distill)
    s = sub.add_parser("sample", help="sample a trained student")
    s.add_argument("run_dir")
    s.add_argument("--out", required=True)
    s.add_argument("--prompt", action="append", help="prompt (repeatable); default: the run's prompts")
    s.add_argument("--num-per-prompt", type=int, default=1)
    s.add_argument("--num-samples", type=int, default=4000, help="mixture runs: number of samples")
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=_sample)
    z = sub.add_parser("zoo", help="re-create the embedded models").add_subparsers(dest="zoo_command")
    z.required = True
    td = z.add_parser("train-digits", help="train the embedded digits teacher from scratch (~20 min on 2 cores)")
    td.add_argument("out_dir")
    td.add_argument("--vae-steps", type=int, default=800)
    td.add_argument("--unet-steps", type=int, default=7000)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--overwrite", action="store_true")
    td.set_defaults(func=_zoo_train_digits)
    tc = z.add_parser("train-classifier", help="train the digits classifier (FID features, prompt accuracy)")
    tc.add_argument("out")
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--overwrite", action="store_true")
    tc.set_defaults(func=_zoo_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options such as --out
    if extra and (args.command != "distill" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except (ConfigError, ValueError) as e:  # bad input: one line, no traceback
        print(f"distill-diffusion: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
