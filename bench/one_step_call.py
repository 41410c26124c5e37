"""A 1-step student sampled at ``LatentConsistencyModelPipeline``'s default 4 steps: is it as good as at 1 step?

    python bench/one_step_call.py RUN [--steps 999 749 499 249] [--num-samples 1000] [--out DIR]

The pipeline's own default is 4 steps, so a 1-step export's bare call needs ``num_inference_steps=1`` (diffusers
refuses 4 steps of an ``original_inference_steps=1`` schedule). This exports the same weights twice, as trained (1
step) and with the multistep sampler on ``--steps`` (re-noising between steps, as every multistep student here
samples: a copy of the run whose config names those timesteps), sweeps both against the digits reference with the
same prompts and seeds, and prints the two rows. Results: docs/BENCHMARKS.md, "A 1-step student at the pipeline's
default 4 steps".
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from distill_diffusion.eval.sweep import run_sweep
from distill_diffusion.pipelines.export import export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--steps", type=int, nargs="+", default=[999, 749, 499, 249])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--out", default="runs/one_step_call")
    args = ap.parse_args()
    out, run = Path(args.out), Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    as_k = out / "run_as_multistep"  # the same final weights under a config that samples them on --steps
    shutil.rmtree(as_k, ignore_errors=True)
    as_k.mkdir()
    shutil.copytree(run / "final", as_k / "final")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["timesteps"] = args.steps
    (as_k / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rows = []
    for name, source in (("as_trained", run), ("multistep", as_k)):
        exp = export(source, out / f"export_{name}", overwrite=True)
        info = json.loads((exp / "export.json").read_text())
        row = run_sweep([str(exp)], "digits", [1], ["ddim"], [1.0], args.num_samples, out / f"sweep_{name}",
                        cache_dir=out / "cache", progress=False)[0]
        rows.append({"export": name, "call": info["call"], **row})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()
                          if k in ("export", "call", "nfe", "fid", "precision", "recall", "fid_pca", "recall_pca",
                                   "prompt_accuracy")}), flush=True)
    (out / "one_step_call.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
