"""The data path at scale: memory and time to the first step with a million prompts or a folder of mixed-size
images, and the data path's throughput at SD 1.5 shapes.

    python bench/data.py [--prompts 1000000] [--images 10000] [--out runs/bench_data] [--parts memory throughput]

memory: each row runs ``distill-diffusion distill configs/digits_dmd2.yaml ... train.steps=3`` in a fresh process
(through `distill_diffusion.cli.main`) and reports its wall time (an upper bound of the time to the first step: it
includes the three steps, the final sampling and the export) and peak resident memory: the training process
(``ru_maxrss`` of itself) and the largest DataLoader worker (of its children). Rows: the shipped prompts (the
baseline), a text file of ``--prompts`` lines encoded each batch, the same prompts from a prompt cache, and (with the
digits GAN terms on) the digits training images in memory (baseline) vs a latent cache of ``--images`` images of
mixed sizes made by ``distill-diffusion data encode-images``. Building the caches is timed too.

throughput: rows per second a `Feed` (2 workers, batch 64) delivers, on this machine, at SD 1.5's shapes:
prompt-cache rows of 77 x 768 fp16 (a synthetic cache), latent-cache rows of 4 x 64 x 64 fp16, prompt strings from
a text file, and JPEG images decoded, resized and center-cropped to 512 x 512 (the on-the-fly image path; the VAE
encode that follows runs on the training device and is not included). A step of B samples that takes s seconds
needs B / s rows per second; the table says which step times each rate keeps fed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = """
import json, resource, sys, time
t0 = float(sys.argv[1])
from distill_diffusion.cli import main
code = main(sys.argv[2:])
print(json.dumps({"code": code, "seconds": time.time() - t0,
                  "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def cli(args: list[str]) -> dict:
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", DRIVER, str(time.time()), *args], capture_output=True, text=True,
                         env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_prompts(path: Path, n: int) -> None:
    if not path.exists():
        with open(path, "w") as f:
            f.writelines(f"a handwritten digit {('zero', 'one', 'two', 'three', 'four')[i % 5]}, sample {i}\n"
                         for i in range(n))


def make_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    if folder.exists():
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(16, 96, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"{i}.jpg", quality=90)
        (sub / f"{i}.txt").write_text(f"a handwritten digit {('zero', 'one', 'two')[i % 3]}")


def memory(args: argparse.Namespace, out: Path) -> list[dict]:
    prompts, images = out / f"prompts_{args.prompts}.txt", out / f"images_{args.images}"
    make_prompts(prompts, args.prompts)
    make_images(images, args.images)
    base = ["distill", "configs/digits_dmd2.yaml", "train.steps=3", "train.progress=false"]
    gan = ["dmd2.gan_student_weight=0.01", "dmd2.gan_critic_weight=0.01"]
    rows = []

    def row(name: str, extra: list[str]) -> None:
        run = out / f"run_{len(rows)}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        result = cli([*base, "--out", str(run), *extra])
        rows.append({"row": name, **{k: round(v, 1) for k, v in result.items() if k != "code"}})
        print(json.dumps(rows[-1]), flush=True)

    def cache(command: str, source: str, what: str) -> Path:
        path = out / f"cache_{command}_{Path(source.split('=', 1)[1]).name}"
        if not (path / "cache.json").exists():
            subprocess.run(["rm", "-rf", str(path)], check=True)
            t0 = time.time()
            cli(["data", command, "configs/digits_dmd2.yaml", "--out", str(path), source])
            rows.append({"row": f"building the cache of {what}", "seconds": round(time.time() - t0)})
        return path

    row("shipped prompts (baseline)", [])
    row(f"{args.prompts:,} prompts, text file, encoded each batch", [f"data.prompt_file={prompts}"])
    prompt_cache = cache("encode-prompts", f"data.prompt_file={prompts}", f"{args.prompts:,} prompts")
    row(f"{args.prompts:,} prompts from the prompt cache", [f"data.prompt_cache={prompt_cache}"])
    row("GAN terms, digits training images in memory (baseline)", [*gan, "data.real=digits"])
    latents = cache("encode-images", f"data.real={images}", f"{args.images:,} images")
    row(f"GAN terms, {args.images:,} mixed-size images from the latent cache", [*gan, f"data.real_cache={latents}"])
    return rows


def throughput(args: argparse.Namespace, out: Path) -> list[dict]:
    import numpy as np
    import torch
    from PIL import Image

    from distill_diffusion.data.cache import Cache, CacheWriter
    from distill_diffusion.data.images import ImageFolder
    from distill_diffusion.data.sources import open_text_source
    from distill_diffusion.data.stream import Feed, _item

    def rate(source, read, n_batches: int = 30, batch: int = 64) -> float:  # noqa: ANN001
        feed = Feed(source, read, 0, "bench", workers=2, prefetch=4)
        feed.next(batch, 0, 1)  # workers started
        t0 = time.time()
        for _ in range(n_batches):
            feed.next(batch, 0, 1)
        return n_batches * batch / (time.time() - t0)

    def synthetic(name: str, shape: tuple[int, ...], rows: int) -> Cache:
        path = out / name
        if not (path / "cache.json").exists():
            subprocess.run(["rm", "-rf", str(path)], check=True)
            writer = CacheWriter(path, "prompts", {}, {"spec": "synthetic", "count": rows}, shard_rows=1024)
            for _ in range(rows // 256):
                writer.add({"embeds": torch.randn(256, *shape).half()})
            writer.finish()
        return Cache(path, "prompts", None, "bench")

    results = []
    prompt_cache = synthetic("sd15_prompt_rows", (77, 768), 8192)
    results.append({"row": "prompt cache rows, 77 x 768 fp16 (SD 1.5)", "rows_per_s": rate(prompt_cache, Cache.row)})
    latent_cache = synthetic("sd15_latent_rows", (4, 64, 64), 16384)
    results.append({"row": "latent cache rows, 4 x 64 x 64 fp16 (SD 1.5 at 512 px)",
                    "rows_per_s": rate(latent_cache, Cache.row)})
    prompts = out / f"prompts_{args.prompts}.txt"
    make_prompts(prompts, args.prompts)
    results.append({"row": f"prompt strings from a {args.prompts:,}-line text file",
                    "rows_per_s": rate(open_text_source(str(prompts)), _item)})
    jpegs = out / "jpegs_512"
    if not jpegs.exists():
        jpegs.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(256):
            w, h = (int(v) for v in rng.integers(512, 900, 2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(jpegs / f"{i}.jpg", quality=90)
    results.append({"row": "JPEGs (512-900 px) decoded, resized, center-cropped to 512 x 512",
                    "rows_per_s": rate(ImageFolder(jpegs, 512), _item, n_batches=8)})
    for r in results:
        r["rows_per_s"] = round(r["rows_per_s"])
        r["keeps_fed"] = f"steps of batch 64 slower than {64 / r['rows_per_s']:.3f} s"
        print(json.dumps(r), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--parts", nargs="*", default=["memory", "throughput"], choices=["memory", "throughput"])
    ap.add_argument("--out", default="runs/bench_data")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    if "memory" in args.parts:
        report["memory"] = memory(args, out)
    if "throughput" in args.parts:
        report["throughput"] = throughput(args, out)
    (out / "data.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
