"""sCM's tangent two ways (torch.func.jvp under the math attention kernel, and a central finite difference): how far
apart they are, and what a training step costs with each, on the tiny SD 1.5, SDXL, SD3 and Flux networks.

    python bench/jvp.py [--kinds sd15 sdxl sd3 flux] [--steps 5] [--out runs/bench_jvp]

Each (kind, mode) runs in a fresh process: the real `Trainer` with ``method: scm`` on the tiny pipeline (batch 2,
the digits images as data), one warm-up step, then ``--steps`` timed steps; memory is the process's peak resident
memory above its level after building the trainer (CPU), or ``torch.cuda.max_memory_allocated`` on a GPU. The
relative difference ``|jvp - fd| / |jvp|`` of cos(t) sin(t) dF/dt is taken at t = 0.4 and 1.2 on fixed inputs.
Results go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(kind: str, mode: str, steps: int) -> dict:
    import torch

    from distill_diffusion.config import parse_config
    from distill_diffusion.methods.scm import TangentTerm
    from distill_diffusion.tiny import tiny_pipeline
    from distill_diffusion.trainer import Trainer

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix=f"jvp_{kind}_"))
    tiny_pipeline(kind).save_pretrained(path)
    vp = kind in ("sd15", "sdxl")
    cfg = parse_config({"method": "scm", "scm": {"jvp": mode, "tangent_warmup": 0},
                        "model": {"teacher": str(path), "timesteps": [999] if vp else [1000]},
                        "train": {"batch_size": 2, "steps": steps + 1, "progress": False},
                        "data": {"prompts": ["a red car", "a blue bird"], "real": "digits"}})
    trainer = Trainer(cfg)
    cuda = torch.cuda.is_available()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainer.train_step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    # the two tangents on fixed inputs
    models = trainer.models
    term = TangentTerm(trainer.method.cfg, models, seed=0)
    cond = models.text.encode(["a red car", "a blue bird"])
    device = next(models.student.parameters()).device
    x = torch.randn(2, *models.sample_shape, generator=torch.Generator().manual_seed(0)).to(device) * 0.5
    t = torch.tensor([0.4, 1.2], dtype=torch.float64, device=device)

    def F(x_, t_):  # noqa: N802, ANN001, ANN202
        return term.trig.F(lambda xt, tau: models.student(xt, tau, cond.to(device)), x_, t_)

    with torch.no_grad():
        dxdt = term.teacher_velocity(x, t, cond.to(device), 1.0)
        term.cfg.jvp = "autograd"
        _, d_jvp = term.tangent_of_F(F, x, t, dxdt)
        term.cfg.jvp = "finite_difference"
        _, d_fd = term.tangent_of_F(F, x, t, dxdt)
    rel = [float((d_jvp[i] - d_fd[i]).norm() / d_jvp[i].norm()) for i in range(2)]
    return {"kind": kind, "mode": mode, "s_per_step": round(seconds, 3), "peak_mib": round(peak, 1),
            "rel_diff_t0.4": rel[0], "rel_diff_t1.2": rel[1], "device": "cuda" if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["sd15", "sdxl", "sd3", "flux"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/bench_jvp")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps)))
        return
    rows = []
    for kind in args.kinds:
        for mode in ("autograd", "finite_difference"):
            done = subprocess.run([sys.executable, __file__, "--one", kind, mode, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "jvp.json").write_text(json.dumps(rows, indent=1))
    print("| network | tangent | s / step | peak MiB | rel. diff t=0.4 | rel. diff t=1.2 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| tiny {r['kind']} | {r['mode']} | {r['s_per_step']} | {r['peak_mib']} | {r['rel_diff_t0.4']:.1e} | "
              f"{r['rel_diff_t1.2']:.1e} |")


if __name__ == "__main__":
    main()
