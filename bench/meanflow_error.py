"""Where MeanFlow's error lives on a digits teacher: at initialisation (the flow-map student is the teacher), the
norm of du/ds along the teacher's velocity (the JVP and the finite difference) and the target's squared error per
element, at fixed flow times s from s_max down, on one seeded batch of real digits with r = 0.

    python bench/meanflow_error.py [--config configs/digits_meanflow.yaml] [--n 16] [key=value ...]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from distill_diffusion import draws
from distill_diffusion.config import load_config
from distill_diffusion.methods.base import student_cond
from distill_diffusion.methods.derivative import derivative_along
from distill_diffusion.trainer import Trainer

S_GRID = (0.2, 0.5, 0.8, 0.9, 0.92, 0.93, 0.935)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/digits_meanflow.yaml")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(tempfile.mkdtemp())
    try:
        trainer = Trainer(load_config(args.config, ["train.progress=false", *args.overrides]), run / "run")
        models, method = trainer.models, trainer.method
        flow, cfg = method.flow, method.cfg
        gen = torch.Generator().manual_seed(0)
        batch = trainer.data.sample(args.n, gen)
        x0, n = batch.real, len(batch.real)
        eps = draws.randn(x0.shape, gen, x0)
        w = torch.full((n,), cfg.teacher_cfg)
        cond = replace(student_cond(models.student, batch.real_cond, w), end_timestep=torch.zeros(n, dtype=x0.dtype))
        print("| s | timestep | norm of du/ds (JVP) | (difference) | norm of v | squared error per element, r = 0 |")
        print("|---|---|---|---|---|---|")
        for s_value in [*[s for s in S_GRID if s < flow.s_max], flow.s_max]:
            s = torch.full((n,), s_value, dtype=torch.float64)
            x = flow.noised(x0, eps, s)

            def u_fn(x_, s_):  # noqa: ANN001, ANN202
                return flow.velocity(lambda xt, tau: models.student(xt, tau, cond), x_, s_)

            with torch.no_grad():
                v = flow.velocity(lambda xt, tau: models.teacher.x0(xt, tau, batch.real_cond, w), x, s)
                u, du = derivative_along(u_fn, x, s, v, "autograd")
                _, du_fd = derivative_along(u_fn, x, s, v, "finite_difference", cfg.fd_step)
            err = (u - (v - s.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) * du)).pow(2).flatten(1).mean(1)
            print(f"| {s_value:.4f} | {flow.timestep(s[:1]).item():.1f} | {du.flatten(1).norm(dim=1).mean():.1f} | "
                  f"{du_fd.flatten(1).norm(dim=1).mean():.1f} | {v.flatten(1).norm(dim=1).mean():.1f} | "
                  f"{err.mean():.3f} |")
    finally:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
