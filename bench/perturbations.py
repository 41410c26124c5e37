"""Do the loss tests catch a wrong term? Each perturbation below changes one term of one method (its sign, weight,
normaliser, CFG scale or time range) in a copy of this checkout, runs the tests that pin that term, and expects them
to fail. Prints one line per perturbation; exit status 1 if any perturbation goes unnoticed.

    python bench/perturbations.py [--only dmd2_sign,...]

The checkout itself is never modified: the copy lives in a temporary directory and is imported through PYTHONPATH,
laid out as the editable install lays it out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
G = "tests/test_golden.py::"
# name: (file, the text replaced, its replacement, the tests that must fail)
DMD2, SID, VSD = (G + "test_dmd2_student_loss_is_the_reference_distribution_matching_loss",
                  G + "test_sid_student_loss_is_the_reference_sid_lsg_generator_loss",
                  G + "test_vsd_student_loss_is_the_reference_swiftbrush_loss")
GAN = G + "test_the_gan_student_term_is_the_reference_softplus"
CRITIC, LCM, PD = (G + "test_critic_losses_are_the_reference_denoising_losses",
                   G + "test_consistency_loss_is_the_reference_lcm_loss",
                   G + "test_progressive_loss_is_the_reference_distillation_loss")
A = "tests/test_golden_adversarial.py::"
LADD_G, ADD_G, LADD_D = (A + "test_ladd_student_loss_is_the_reference_generator_loss",
                         A + "test_add_student_loss_adds_the_alpha_weighted_distillation_term",
                         A + "test_ladd_discriminator_loss_is_the_reference_loss")
ADV = "methods/adversarial.py"
ODE = ("tests/test_trajectory_critic.py::"
       "test_the_trajectory_term_pulls_late_steps_toward_the_teachers_ode_from_their_input")
# name: (file, the text replaced, its replacement, the tests that must fail)
PERTURBATIONS = {
    "dmd2_sign": ("methods/dmd2.py", "nan_to_num((x0_fake - x0_real)", "nan_to_num((x0_real - x0_fake)", DMD2),
    "dmd2_normaliser": ("methods/dmd2.py", "/ per_sample_mean_abs(p_real)", "/ per_sample_mean_abs(x0_fake - x0_real)",
                        DMD2),
    "dmd2_half": ("methods/dmd2.py", "loss = 0.5 * F.mse_loss(", "loss = 1.0 * F.mse_loss(", DMD2),
    "dmd2_time_range": ("methods/dmd2.py", "x.detach(), cfg.t_min, cfg.t_max, generator)",
                        "x.detach(), 0.0, cfg.t_max, generator)", DMD2),
    "dmd2_teacher_cfg": ("methods/score.py", "teacher.x0(x_t, t, cond, self.cfg.teacher_cfg)",
                         "teacher.x0(x_t, t, cond, 1.0)", DMD2),
    "sid_alpha_sign": ("methods/sid.py", "((y_real - x) - cfg.alpha * diff)", "((y_real - x) + cfg.alpha * diff)",
                       SID),
    "sid_alpha_weight": ("methods/sid.py", "((y_real - x) - cfg.alpha * diff)", "((y_real - x) - 1.0 * diff)", SID),
    "sid_normaliser": ("methods/sid.py", "- cfg.alpha * diff) / w)", "- cfg.alpha * diff))", SID),
    "sid_residual_sign": ("methods/sid.py", "((y_real - x) - cfg.alpha * diff)", "((x - y_real) - cfg.alpha * diff)",
                          SID),
    "sid_time_range": ("methods/sid.py", "x, cfg.t_min, cfg.t_max, generator)", "x, cfg.t_min, 1.0, generator)", SID),
    "sid_critic_cfg": ("methods/score.py", "cond, self.cfg.critic_cfg)", "cond, self.cfg.teacher_cfg)", SID),
    "vsd_weight": ("methods/vsd.py", "nan_to_num(sigma.pow(2) *", "nan_to_num((1 - sigma.pow(2)) *", VSD),
    "vsd_sign": ("methods/vsd.py", "* (eps_real - eps_fake))", "* (eps_fake - eps_real))", VSD),
    "vsd_time_range": ("methods/vsd.py", "x.detach(), cfg.t_min, cfg.t_max, generator)",
                       "x.detach(), cfg.t_min, 1.0, generator)", VSD),
    "gan_student_sign": ("methods/score.py", "loss_gan = F.softplus(-gan.logits(", "loss_gan = F.softplus(gan.logits(",
                         GAN),
    "gan_student_weight": ("methods/score.py", "loss + self.cfg.gan_student_weight * loss_gan",
                           "loss + self.cfg.gan_critic_weight * loss_gan", GAN),
    "critic_time_range": ("methods/score.py", "x, cfg.critic_t_min, cfg.critic_t_max, generator)",
                          "x, 0.02, cfg.critic_t_max, generator)", CRITIC),
    "critic_alpha2_weight": ("methods/score.py", "per_sample = alpha.pow(2) * per_sample",
                             "per_sample = alpha * per_sample", CRITIC),
    "lcm_cfg_form": ("methods/consistency.py", "teacher.x0(x_t, t, cond, w)", "teacher.x0(x_t, t, cond, w - 1)", LCM),
    "lcm_skip": ("methods/consistency.py", "self.k = cfg.skip * (T // cfg.grid_steps)",
                 "self.k = 2 * cfg.skip * (T // cfg.grid_steps)", LCM),
    "lcm_huber_c": ("methods/consistency.py", "** 2 + cfg.huber_c**2)", "** 2 + (10 * cfg.huber_c)**2)", LCM),
    "pd_weight": ("methods/progressive.py", "weight = snr.clamp_min(1.0) if", "weight = snr if", PD),
    "pd_target": ("methods/progressive.py", "return (z_end - ratio * z_t) / (a_e - ratio * a_t)", "return z_end", PD),
    "pd_teacher_cfg": ("methods/progressive.py", "teacher.x0(x_t, t, cond, self.cfg.teacher_cfg)",
                       "teacher.x0(x_t, t, cond, 1.0)", PD),
    "ladd_student_sign": (ADV, "loss_gan = F.softplus(-d_fake).mean() if", "loss_gan = F.softplus(d_fake).mean() if",
                          LADD_G),
    "ladd_hinge_student_sign": (ADV, "else -d_fake.mean()", "else d_fake.mean()", LADD_G),
    "ladd_student_time_range": (ADV, "fake_t, t, _ = noised(self.models.process, x, cfg.t_min, cfg.t_max, generator)",
                                "fake_t, t, _ = noised(self.models.process, x, 0.0, cfg.t_max, generator)", LADD_G),
    "add_distill_weight": (ADV, "loss = loss + cfg.distill_weight * loss_distill", "loss = loss + loss_distill",
                           ADD_G),
    "add_c_of_t": (ADV, "(alpha.flatten() * (x.float()", "(alpha.flatten().pow(2) * (x.float()", ADD_G),
    "add_teacher_time_range": (ADV, "noised(m.process, x.detach(), 0.0, 1.0, generator)",
                               "noised(m.process, x.detach(), self.cfg.t_min, self.cfg.t_max, generator)", ADD_G),
    "add_teacher_cfg": (ADV, "batch.cond, self.cfg.teacher_cfg).to(x.dtype)", "batch.cond, 1.0).to(x.dtype)", ADD_G),
    "ladd_critic_sign": (ADV, "(F.softplus(d_fake) + F.softplus(-d_real))",
                         "(F.softplus(-d_fake) + F.softplus(d_real))", LADD_D),
    "ladd_hinge_margin": (ADV, "F.relu(1 + d_fake)", "F.relu(d_fake)", LADD_D),
    "ladd_critic_time_range": (ADV, "batch.real.to(x.dtype), cfg.t_min, cfg.t_max, generator)",
                               "batch.real.to(x.dtype), 0.0, cfg.t_max, generator)", LADD_D),
    "ladd_same_t": (ADV, "self.d(real_t, t_r, batch.real_cond)", "self.d(real_t, t_f, batch.real_cond)", LADD_D),
    "r1_weight": (ADV, "loss = loss + cfg.r1_weight * r1", "loss = loss + r1", LADD_D),
    "r1_sigma": (ADV, "real_t + cfg.r1_sigma *", "real_t + 2 * cfg.r1_sigma *", LADD_D),
    "ode_sign": ("methods/score.py", "return loss + cfg.ode_weight * loss_ode",
                 "return loss - cfg.ode_weight * loss_ode", ODE),
    "ode_weight": ("methods/score.py", "return loss + cfg.ode_weight * loss_ode", "return loss + loss_ode", ODE),
    "ode_steps_taking_it": ("methods/score.py", "rows = k >= cfg.ode_from_step", "rows = k > cfg.ode_from_step", ODE),
    "ode_teacher_cfg": ("methods/score.py", "teacher.x0(z, t, c, cfg.teacher_cfg)", "teacher.x0(z, t, c)", ODE),
    "ode_grid": ("methods/score.py", "(1 - j / cfg.ode_steps)", "(1 - j / (cfg.ode_steps + 1))", ODE),
    "ode_normaliser": ("methods/score.py", "norm = per_sample_mean_abs(diff)", "norm = per_sample_mean_abs(x)", ODE),
}


def checkout_copy(where: Path) -> Path:
    """This working tree's code and tests under ``where``; returns the directory to put first on PYTHONPATH."""
    for name in ("distill_diffusion", "methods", "pipelines", "eval", "tests", "configs", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, where / name)
    for sub in ("methods", "pipelines", "eval"):
        (where / "distill_diffusion" / sub).symlink_to(where / sub)
    path = where / "_path"
    path.mkdir()
    (path / "distill_diffusion").symlink_to(where / "distill_diffusion")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(PERTURBATIONS)}")
    args = ap.parse_args()
    todo = {k: v for k, v in PERTURBATIONS.items() if args.only is None or k in args.only.split(",")}
    unnoticed = []
    with tempfile.TemporaryDirectory(prefix="perturb_") as tmp:
        copy = Path(tmp)
        path = checkout_copy(copy)
        env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        baseline = sorted({t for *_, tests in todo.values() for t in tests.split()})
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *baseline], cwd=copy,
                           env=env, capture_output=True, text=True)
        if r.returncode != 0:  # a perturbation is only caught if the tests pass without it
            print("the tests fail before any perturbation:\n" + r.stdout[-2000:])
            return 1
        for name, (rel, old, new, tests) in todo.items():
            file = copy / rel
            text = file.read_text()
            if text.count(old) != 1:
                print(f"{name}: the text to perturb is not in {rel} exactly once; update this script", flush=True)
                unnoticed.append(name)
                continue
            file.write_text(text.replace(old, new))
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                    *tests.split()], cwd=copy, env=env, capture_output=True, text=True)
            finally:
                file.write_text(text)
            caught = r.returncode != 0 and "failed" in r.stdout
            print(f"{name}: {'caught' if caught else 'NOT CAUGHT'} ({rel}: {old!r} -> {new!r})", flush=True)
            if not caught:
                unnoticed.append(name)
    return 1 if unnoticed else 0


if __name__ == "__main__":
    raise SystemExit(main())
