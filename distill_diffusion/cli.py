"""``distill-diffusion``: the command line.

    distill-diffusion run CONFIG [--out DIR] [--resume] [key=value ...]     distill -> export -> sweep -> report.md
    distill-diffusion distill CONFIG [--out DIR] [--resume] [key=value ...]
    distill-diffusion export RUN_DIR OUT_DIR [--lora] [--overwrite]
    distill-diffusion sample MODEL --out DIR [--prompt TEXT ... | --prompts FILE] [--num-per-prompt N] [--steps K]
                             [--guidance W] [--scheduler ddim|euler|dpmpp] [--seed S]
    distill-diffusion eval sweep MODEL... --ref REF --out DIR [--nfe 1,2,4,...] [--solvers ddim,euler,dpmpp]
                             [--guidance 1,3] [--num-samples N]
    distill-diffusion data encode-prompts CONFIG --out CACHE [--batch N] [--dtype float16|bfloat16|float32] [k=v ...]
    distill-diffusion data encode-images CONFIG --out CACHE [--batch N] [--dtype ...] [--workers N] [k=v ...]
    distill-diffusion data verify CACHE
    distill-diffusion zoo train-digits OUT_DIR | zoo train-digits-flow OUT_DIR | zoo train-classifier OUT

Errors are one line naming what was wrong and what is allowed; the exit status is then 2.

Each command imports what it runs when it runs, so ``--help`` and argument errors answer at once (torch and diffusers
take seconds to import); no import here is placed to dodge a cycle, and the package has none.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .cli_args import Parser, count, counts, names, non_negative, positive, scale, scales
from .errors import ConfigError, RunError


def _out_dir(path: str, option: str = "--out") -> Path:
    from .files import check_out_dir

    return check_out_dir(path, option)


def _distill(args: argparse.Namespace) -> None:
    from .config import load_config
    from .trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    trainer = Trainer(cfg, out, resume=args.resume)
    metrics = trainer.train()
    if not trainer.is_main:  # the other data-parallel processes stop here; one exports and reports
        return
    result = {"run": str(out), **metrics}
    if cfg.model.teacher != "gmm":  # every image run ends with its diffusers export
        from .pipelines.export import export_run

        exports = export_run(out, lora_student=cfg.model.student_lora_rank is not None)
        result.update({k: str(v) for k, v in exports.items()})
    print(json.dumps(result))


def _run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .job import run_job

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    report = run_job(cfg, out, resume=args.resume)
    if report is not None:  # None: another data-parallel process writes it
        print(f"wrote {report}")


def _export(args: argparse.Namespace) -> None:
    from .pipelines.export import export

    _out_dir(args.out_dir, "OUT_DIR")
    print(f"wrote {export(args.run_dir, args.out_dir, lora=args.lora, overwrite=args.overwrite)}")


def _read_prompt_args(args: argparse.Namespace) -> list[str] | None:
    from .data import read_prompt_file

    if args.prompts is None:
        return args.prompt
    prompts = read_prompt_file(args.prompts)
    if not prompts:
        raise ConfigError(f"prompt file {args.prompts!r} has no non-blank line")
    return (args.prompt or []) + prompts


def _sample_mixture(args: argparse.Namespace, models, tmp: Path, seed: int) -> None:  # noqa: ANN001
    from safetensors.torch import save_file

    from .denoiser import Cond
    from .eval.mixture import mixture_metrics
    from .preview import scatter, student_samples

    if args.prompt or args.prompts:
        raise ConfigError("a mixture run takes no --prompt; use --num-samples")
    labels = models.mixture.balanced_labels(args.num_samples)
    x = student_samples(models, Cond(labels=labels), len(labels), seed)
    metrics = mixture_metrics(x, labels, models.mixture)
    save_file({"samples": x.contiguous(), "labels": labels}, str(tmp / "samples.safetensors"))
    scatter(x, labels, tmp / "samples.png", " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))


def _sample(args: argparse.Namespace) -> None:
    """One PNG per image and a samples.jsonl line per image, for a teacher pipeline or a distilled student."""
    from PIL import Image

    from .eval.generate import check_solver, load_model
    from .preview import PREVIEW_SEED

    out = _out_dir(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {str(out)!r} is not empty; choose another --out")
    prompts = _read_prompt_args(args)
    model = load_model(args.model)
    if args.scheduler is not None:
        check_solver(args.scheduler)
    seed = PREVIEW_SEED if args.seed is None else args.seed
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if model.run is not None and model.run.models.family == "gmm":
            _sample_mixture(args, model.run.models, tmp, seed)
        else:
            from .eval.generate import generate

            if model.is_student:
                if args.steps is not None or args.scheduler is not None or args.guidance is not None:
                    raise ConfigError("a distilled student samples on its own timesteps without CFG; "
                                      "drop --steps / --scheduler / --guidance")
                if not prompts and model.run is None:
                    raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE")
                if not prompts:  # the run's own: its prompt list, or the first 8 of its prompt file
                    from .data import first_prompts

                    data = model.run.cfg.data
                    prompts = first_prompts(data, 8) if data.prompt_file else list(data.prompts)
                steps, guidance, solver = model.student_steps, 1.0, "student"
            else:
                if not prompts:
                    raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE")
                steps = args.steps or 50
                guidance = 1.0 if args.guidance is None else args.guidance
                solver = args.scheduler or "ddim"
            all_prompts = [p for p in prompts for _ in range(args.num_per_prompt)]
            seeds = [seed + j for _ in prompts for j in range(args.num_per_prompt)]
            images, _ = generate(model, all_prompts, seeds, steps, guidance, solver, progress=False)
            lines = []
            for k, (img, prompt, s) in enumerate(zip(images, all_prompts, seeds)):
                name = f"{k:05d}.png"
                Image.fromarray(img).save(tmp / name)
                record = {"file": name, "prompt": prompt, "seed": s, "steps": steps, "guidance": guidance,
                          "scheduler": solver}
                if model.is_student:
                    record["timesteps"] = model.timesteps
                lines.append(json.dumps(record))
            (tmp / "samples.jsonl").write_text("\n".join(lines) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    print(f"wrote {out}")


def _eval_sweep(args: argparse.Namespace) -> None:
    from .eval.generate import check_solver
    from .eval.sweep import run_sweep  # checks --out and --cache-dir before writing

    prompts = _read_prompt_args(args) if args.prompts else None
    solvers = [check_solver(s) for s in args.solvers.split(",")]
    run_sweep(args.models, args.ref, args.nfe, solvers, args.guidance, args.num_samples, args.out,
              features=args.features, batch_size=args.batch_size, prompts=prompts, cache_dir=args.cache_dir,
              extra_features=args.extra_features)
    print((Path(args.out) / "sweep.md").read_text())


def _zoo_out(args: argparse.Namespace) -> Path:
    out = _out_dir(args.out_dir, "OUT_DIR")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"output directory {str(out)!r} is not empty; pass --overwrite or choose another")
    return out


def _zoo_train_digits(args: argparse.Namespace) -> None:
    from .zoo.train_digits import train_digits

    print(json.dumps(train_digits(_zoo_out(args), vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                                  seed=args.seed, lr=args.lr, max_shift=args.max_shift, init_from=args.init_from)))


def _zoo_train_digits_flow(args: argparse.Namespace) -> None:
    from .zoo.train_digits_flow import train_digits_flow

    print(json.dumps(train_digits_flow(_zoo_out(args), steps=args.steps, seed=args.seed, lr=args.lr)))


def _data_encode(args: argparse.Namespace) -> None:
    from .config import load_config
    from .data.prepare import encode_images, encode_prompts

    cfg = load_config(args.config, args.overrides)
    out = _out_dir(args.out)
    if args.data_command == "encode-prompts":
        manifest = encode_prompts(cfg, out, batch=args.batch, dtype=args.dtype, device=args.device)
    else:
        manifest = encode_images(cfg, out, batch=args.batch, dtype=args.dtype, device=args.device,
                                        workers=args.workers)
    print(f"wrote {manifest}")


def _data_verify(args: argparse.Namespace) -> None:
    from .data.cache import verify

    manifest = verify(args.cache)
    print(f"{args.cache}: {manifest['count']} {manifest['kind']} rows in {len(manifest['shards'])} shards, intact")


def _zoo_train_classifier(args: argparse.Namespace) -> None:
    from .zoo.classifier import train_classifier

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite or choose another path")
    _, stats = train_classifier(out, seed=args.seed)
    print(json.dumps(stats))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="distill-diffusion", description="Few-step diffusion distillation.")
    sub = parser.add_subparsers(dest="command", metavar="{run,distill,export,sample,eval,data,zoo}")
    sub.required = True
    for name, func, helptext in (
        ("run", _run, "distill, export, sweep the student against the teacher and write report.md"),
        ("distill", _distill, "train a few-step student from a YAML config (and export it)"),
    ):
        d = sub.add_parser(name, help=helptext)
        d.add_argument("config", help="experiment YAML, e.g. configs/digits_dmd2.yaml")
        d.add_argument("--out", help="run directory (default: runs/<config name>)")
        d.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
        d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")
        d.set_defaults(func=func)
    x = sub.add_parser("export", help="write a run's student as a plain diffusers pipeline (or LoRA weights)")
    x.add_argument("run_dir")
    x.add_argument("out_dir")
    x.add_argument("--lora", action="store_true", help="LoRA weights for the teacher pipeline (LoRA students)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    x.set_defaults(func=_export)
    s = sub.add_parser("sample", help="sample a teacher (embedded:digits, a diffusers dir) or a run's student")
    s.add_argument("model", help="embedded:digits, a diffusers pipeline directory, or a run directory")
    s.add_argument("--out", required=True)
    s.add_argument("--prompt", action="append", help="prompt (repeatable); a run's own prompts by default")
    s.add_argument("--prompts", help="file with one prompt per line")
    s.add_argument("--num-per-prompt", type=count, default=1)
    s.add_argument("--steps", type=count, help="teacher sampling steps (default 50)")
    s.add_argument("--guidance", type=scale, help="teacher CFG scale (default 1: none)")
    s.add_argument("--scheduler", help="teacher solver: ddim (default), euler, dpmpp")
    s.add_argument("--seed", type=non_negative, default=None, help="first seed; image j of a prompt uses seed + j")
    s.add_argument("--num-samples", type=count, default=4000, help="mixture runs: number of samples")
    s.set_defaults(func=_sample)
    e = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command")
    e.required = True
    sw = e.add_parser("sweep", help="FID (and prompt accuracy) against NFE, with latency and throughput")
    sw.add_argument("models", nargs="+", help="teachers (embedded:digits, diffusers dirs) and run directories")
    sw.add_argument("--ref", required=True, help="digits, a folder of images, or a .npz of feature statistics")
    sw.add_argument("--nfe", type=counts, default=[1, 2, 4, 8, 16, 32, 50],
                    help="network evaluations per image (CFG costs two a step)")
    sw.add_argument("--solvers", default="ddim,euler,dpmpp")
    sw.add_argument("--guidance", type=scales, default=[1.0], help="teacher CFG scales, comma-separated (1 = none)")
    sw.add_argument("--num-samples", type=count, default=1000)
    sw.add_argument("--features", default="auto", help="auto (digits classifier for --ref digits, else clean), "
                    "clean, torchmetrics")
    sw.add_argument("--extra-features", type=names, default=[],
                    help="further feature spaces beside the primary and pixel PCA, comma-separated: dinov2, clip, or "
                    "dinov2:NAME_OR_DIR / clip:NAME_OR_DIR (FD_DINOv2, FD_CLIP; weights from the hub or a local copy)")
    sw.add_argument("--prompts", help="prompt file (required unless --ref digits)")
    sw.add_argument("--prompt", action="append", help=argparse.SUPPRESS)
    sw.add_argument("--batch-size", type=count, default=250)
    sw.add_argument("--cache-dir", default=None, help="where reference statistics are cached")
    sw.add_argument("--out", required=True)
    sw.set_defaults(func=_eval_sweep)
    dt = sub.add_parser("data", help="on-disk caches of prompt embeddings and image latents").add_subparsers(
        dest="data_command")
    dt.required = True
    for name, what, batch in (("encode-prompts", "data.prompt_file's prompts with the teacher's text encoders",
                               256),
                              ("encode-images", "data.real's images with the teacher's VAE", 64)):
        d = dt.add_parser(name, help=f"cache {what}")
        d.add_argument("config", help="the experiment YAML whose teacher and data section name what to encode")
        d.add_argument("--out", required=True, help="cache directory (rerun the command to finish a killed build)")
        d.add_argument("--batch", type=count, default=batch)
        d.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32")
        d.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES") else "cpu",
                       help="where the encoders run (cpu, cuda, cuda:1, ...)")
        if name == "encode-images":
            d.add_argument("--workers", type=non_negative, default=None, help="decoding workers (data.workers)")
        else:
            d.set_defaults(workers=None)
        d.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.real=images/")
        d.set_defaults(func=_data_encode)
    v = dt.add_parser("verify", help="check every shard of a cache against its recorded SHA-256")
    v.add_argument("cache")
    v.set_defaults(func=_data_verify)
    z = sub.add_parser("zoo", help="re-create the embedded models").add_subparsers(dest="zoo_command")
    z.required = True
    td = z.add_parser("train-digits", help="train the embedded digits teacher from scratch (~28 min on 2 cores)")
    td.add_argument("out_dir")
    td.add_argument("--vae-steps", type=count, default=800)
    td.add_argument("--unet-steps", type=count, default=6500)
    td.add_argument("--seed", type=non_negative, default=0)
    td.add_argument("--lr", type=positive, default=1e-3, help="UNet peak learning rate (one-cycle schedule)")
    td.add_argument("--max-shift", type=non_negative, default=0, help="random shift augmentation in pixels (0: none)")
    td.add_argument("--init-from", default=None, help="continue from a pipeline this command made (fine-tuning)")
    td.add_argument("--overwrite", action="store_true")
    td.set_defaults(func=_zoo_train_digits)
    tf = z.add_parser("train-digits-flow", help="train the embedded SD3-shaped flow-matching digits teacher "
                      "(~40 min on 2 cores; its autoencoder is embedded:digits')")
    tf.add_argument("out_dir")
    tf.add_argument("--steps", type=count, default=6000)
    tf.add_argument("--seed", type=non_negative, default=0)
    tf.add_argument("--lr", type=positive, default=1e-3, help="transformer peak learning rate (one-cycle schedule)")
    tf.add_argument("--overwrite", action="store_true")
    tf.set_defaults(func=_zoo_train_digits_flow)
    tc = z.add_parser("train-classifier", help="train the digits classifier (FID features, prompt accuracy)")
    tc.add_argument("out")
    tc.add_argument("--seed", type=non_negative, default=0)
    tc.add_argument("--overwrite", action="store_true")
    tc.set_defaults(func=_zoo_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes (train.optimizer adamw8bit) fetches a 4-bit CPU kernel this tool never uses at import, through the
    # `kernels` package (a transformers dependency since 5.25), and both warn about it when the Hub is offline
    for name in ("bitsandbytes.backends.cpu.ops", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options such as --out
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except (ConfigError, ValueError, RunError) as e:  # one line, no traceback; what was written before is intact
        print(f"distill-diffusion: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunError) else 2  # 1: the run could not go on; 2: bad input
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
