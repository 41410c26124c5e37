"""The leaderboard: every method at 1 and 4 steps on one teacher, under one wall-clock budget per cell, each export
swept against the teacher's FID-vs-NFE curve with the same prompts, seeds and reference.

    python bench/leaderboard.py --teacher digits [--minutes 5] [--seeds 0 1] [--methods dmd2 sid ...]
                                [--steps 1 4] [--num-samples 1000] [--out docs/results/leaderboard/digits]
    python bench/leaderboard.py --teacher digits --table-only     (rewrite the table and plot from finished cells)

A cell is one (method, student steps, seed): `distill` with the method's digits recipe (`RECIPES`: its config in
configs/ and the overrides that fit the budget) stopped by ``train.max_seconds``, the export, and a sweep of the
export. A finished cell (``OUT/cells/<method>_<k>step_seed<s>/result.json``) is never run again, so the board can be
filled over several sessions or on a faster machine (the budget is wall-clock: say which machine in the docs). A
method with no recipe for the teacher, or one that fails, gets a row that says why. The teacher's curve (DDIM at
CFG 1 and 2 over NFE 1 .. 50) is swept once into ``OUT/teacher``.

Writes OUT/leaderboard.md (one table: FID and recall in both feature spaces, precision, prompt accuracy, NFE,
latency, distillation time and updates, mean and range over seeds), OUT/leaderboard.json and OUT/leaderboard.png
(the teacher's curves with every student as a point, one panel per feature space).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from distill_diffusion import zoo
from distill_diffusion.config import load_config
from distill_diffusion.eval.sweep import run_sweep
from distill_diffusion.methods import METHODS
from distill_diffusion.pipelines.export import export_run
from distill_diffusion.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TEACHERS = {"digits": "embedded:digits", "digits-flow": "embedded:digits-flow"}
GRIDS = {"digits": {1: [999], 4: [999, 749, 499, 249]}, "digits-flow": {1: [1000], 4: [1000, 750, 500, 250]}}
SOLVER = {"digits": "ddim", "digits-flow": "euler"}  # the teacher's own solver for its curve
# (teacher, method, student steps) -> (config, overrides); the 5-minute recipes: each config's own recipe, its step
# count left to the budget, and where a schedule is counted in updates, that schedule shortened to fit
RECIPES: dict[tuple[str, str, int], tuple[str, list[str]]] = {
    ("digits", "dmd2", 1): ("digits_dmd2_1step.yaml", []),
    ("digits", "dmd2", 4): ("digits_dmd2.yaml", []),
    ("digits", "progressive", 1): ("digits_progressive.yaml", ["progressive.steps_per_round=200"]),  # 8 > 4 > 2 > 1
    ("digits", "progressive", 4): ("digits_progressive.yaml", ["progressive.steps_per_round=600"]),  # 8 > 4
    **{("digits", m, k): (f"digits_{m}.yaml", []) for m in ("sid", "sida", "vsd", "consistency", "ladd", "add",
                                                               "scm", "rcm", "meanflow")
       for k in (1, 4)},
    ("digits", "tdm", 4): ("digits_tdm.yaml", []),
}
# cells a method cannot be, with the reason its row gives
NOT_A_CELL = {("tdm", 1): "a 1-step student has no trajectory: TDM at one step is DMD2 (its row)"}
# the flow teacher: the same recipes on the flow grid, with the flow mixture's findings (docs/methods.md, "the flow
# path"): SD3's timestep shift 3 for the score family, and SiD's 1-step student at SiD-LSG's t_init 625; the teacher's
# CFG wherever a recipe guides it is the flow teacher's best (zoo.DIGITS_FLOW_BEST_GUIDANCE, 1.3), not 2
FLOW_CFG = zoo.DIGITS_FLOW_BEST_GUIDANCE
SCORE = {"dmd2": "dmd2", "sid": "sid", "sida": "sid", "vsd": "vsd", "rcm": "rcm", "tdm": "tdm"}
GUIDED = {**SCORE, "consistency": "consistency", "progressive": "progressive", "add": "add", "scm": "scm",
          "meanflow": "meanflow"}
for (t, m, k), (c, o) in list(RECIPES.items()):
    if t == "digits":
        extra = [f"{SCORE[m]}.t_shift=3.0"] if m in SCORE else []
        extra += [f"{GUIDED[m]}.teacher_cfg={FLOW_CFG}"] if m in GUIDED else []
        extra += [f"vsd.critic_cfg={FLOW_CFG}"] if m == "vsd" else []
        RECIPES[("digits-flow", m, k)] = (c, [*o, "model.teacher=embedded:digits-flow", *extra])
TEACHER_CFGS = {"digits": [1.0, zoo.DIGITS_BEST_GUIDANCE], "digits-flow": [1.0, FLOW_CFG]}  # none, the best
GRID_OVERRIDE = {("digits-flow", "sid", 1): [625], ("digits-flow", "sida", 1): [625]}
NFES = [1, 2, 4, 8, 16, 32, 50]


def cell_name(method: str, steps: int, seed: int) -> str:
    return f"{method}_{steps}step_seed{seed}"


def run_cell(teacher: str, method: str, steps: int, seed: int, minutes: float, num_samples: int, out: Path,
             updates_from: int | None = None) -> dict:
    """Distill, export and sweep one cell; its result.json is written last (a cell without one is run again).
    ``updates_from``: train for as many updates as the same cell of that seed got (a budget in updates, for a
    second seed on another day's machine) instead of ``minutes`` of wall-clock."""
    cell = out / "cells" / cell_name(method, steps, seed)
    if (cell / "result.json").is_file():
        return json.loads((cell / "result.json").read_text())
    recipe = RECIPES.get((teacher, method, steps))
    result: dict = {"method": method, "steps": steps, "seed": seed, "budget_s": 60 * minutes}
    budget = [f"train.max_seconds={60 * minutes}", "train.steps=1000000"]
    if updates_from is not None:
        ref = out / "cells" / cell_name(method, steps, updates_from) / "result.json"
        updates = json.loads(ref.read_text()).get("updates") if ref.is_file() else None
        if not updates:
            result["skipped"] = f"no finished seed-{updates_from} cell to take the update budget from"
            return result
        result.update(budget_s=None, budget_updates=updates, updates_from_seed=updates_from)
        budget = ["train.max_seconds=0", f"train.steps={updates}"]
    if recipe is None:
        result["skipped"] = NOT_A_CELL.get((method, steps), f"no {steps}-step recipe for {method} on {teacher} yet")
        return result
    config, overrides = recipe
    shutil.rmtree(cell, ignore_errors=True)  # a cell killed half-way starts again
    grid = GRID_OVERRIDE.get((teacher, method, steps), GRIDS[teacher][steps])
    cfg = load_config(CONFIGS / config, [*overrides, f"model.timesteps={grid}", f"train.seed={seed}", *budget,
                                         "train.progress=false", "train.checkpoint_every=1000000"])
    t0 = time.time()
    try:
        trainer = Trainer(cfg, cell / "run")
        trainer.train()
        result.update(distill_s=round(time.time() - t0, 1), updates=trainer.step, config=config,
                      overrides=overrides)
        export = export_run(cell / "run", lora_student=False)["export"]
        rows = run_sweep([str(export)], cfg.eval.ref, NFES, ["ddim"], [1.0], num_samples, cell / "sweep",
                         cache_dir=out / "cache", progress=False)
        result["row"] = rows[0]
    except Exception as e:  # noqa: BLE001 (a method that fails on this teacher is a row that says so)
        result["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    shutil.rmtree(cell / "run" / "checkpoints", ignore_errors=True)  # the final weights and export stay
    (cell / "result.json").write_text(json.dumps(result, indent=1))
    return result


def teacher_rows(teacher: str, num_samples: int, out: Path) -> list[dict]:
    path = out / "teacher" / "sweep.json"
    if not path.is_file():
        shutil.rmtree(out / "teacher", ignore_errors=True)
        run_sweep([TEACHERS[teacher]], "digits", NFES, [SOLVER[teacher]], TEACHER_CFGS[teacher], num_samples,
                  out / "teacher", cache_dir=out / "cache", progress=False)
    return json.loads(path.read_text())["rows"]


def summarise(results: list[dict]) -> list[dict]:
    """One line per (method, steps): means and ranges over the seeds that finished."""
    lines: dict[tuple[str, int], dict] = {}
    for r in results:
        line = lines.setdefault((r["method"], r["steps"]), {"method": r["method"], "steps": r["steps"], "cells": []})
        line["cells"].append(r)
    for line in lines.values():
        done = [c for c in line["cells"] if "row" in c]
        line["seeds"] = [c["seed"] for c in done]
        notes = {c.get("skipped") or c.get("failed") for c in line["cells"] if "row" not in c}
        line["note"] = "; ".join(sorted(n for n in notes if n))
        for key in ("fid", "precision", "recall", "fid_pca", "recall_pca", "prompt_accuracy", "ms_per_image", "nfe"):
            vals = [c["row"][key] for c in done if key in c["row"]]
            if vals:
                line[key] = (float(np.mean(vals)), float(min(vals)), float(max(vals)))
        for key in ("distill_s", "updates"):
            vals = [c[key] for c in done if key in c]
            if vals:
                line[key] = float(np.mean(vals))
    return sorted(lines.values(), key=lambda x: (x["steps"], x.get("fid", (np.inf,))[0]))


def markdown(lines: list[dict], teacher: list[dict], minutes: float) -> str:
    def cell(line: dict, key: str, fmt: str = ".2f") -> str:
        if key not in line:
            return "-"
        mean, lo, hi = line[key]
        return f"{mean:{fmt}}" if lo == hi else f"{mean:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"

    head = ("| model | steps | NFE | FID | recall | precision | FID pca | recall pca | prompt acc. | ms / image | "
            "distill min | updates | seeds | note |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for line in lines:
        out.append("| " + " | ".join([
            line["method"], str(line["steps"]), cell(line, "nfe", ".0f"), cell(line, "fid"),
            cell(line, "recall", ".3f"), cell(line, "precision", ".3f"), cell(line, "fid_pca", ".3f"),
            cell(line, "recall_pca", ".3f"),
            cell(line, "prompt_accuracy", ".3f"), cell(line, "ms_per_image"),
            f"{line['distill_s'] / 60:.1f}" if "distill_s" in line else "-",
            f"{line['updates']:.0f}" if "updates" in line else "-",
            ", ".join(map(str, line["seeds"])) or "-", line["note"] or ""]) + " |")
    out += ["", f"Teacher ({teacher[0]['solver']}; same prompts, seeds and reference), budget {minutes:g} min per "
            "student cell:", "",
            "| CFG | steps | NFE | FID | recall | FID pca | recall pca | prompt acc. |",
            "|---|---|---|---|---|---|---|---|"]
    for r in teacher:
        out.append(f"| {r['guidance']:g} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | {r['recall']:.3f} | "
                   f"{r.get('fid_pca', float('nan')):.3f} | {r.get('recall_pca', float('nan')):.3f} | "
                   f"{r.get('prompt_accuracy', float('nan')):.3f} |")
    return "\n".join(out) + "\n"


def plot(lines: list[dict], teacher: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    markers = "os^vD<>pP*hX"
    for ax, key, name in ((axes[0], "fid", "FID (digits classifier)"), (axes[1], "fid_pca", "FID (pixel PCA)")):
        for w in sorted({r["guidance"] for r in teacher}):
            rs = sorted((r for r in teacher if r["guidance"] == w), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rs], [r[key] for r in rs], ".-", color="gray" if w == 1 else "black",
                    label=f"teacher {rs[0]['solver']}, CFG {w:g}")
        methods = sorted({line["method"] for line in lines})
        for line in lines:
            if key in line:
                i = methods.index(line["method"])
                ax.plot(line["nfe"][0], line[key][0], markers[i % len(markers)], color=f"C{i}", ms=7,
                        label=f"{line['method']} {line['steps']}-step",
                        fillstyle="full" if line["steps"] == 1 else "none")
        ax.set_xscale("log")
        ax.set_yscale("log")  # a collapsed cell (FID in the hundreds) must not flatten the rest
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="digits", choices=sorted(TEACHERS))
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--methods", nargs="+", default=sorted(METHODS) + ["sida"])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-only", action="store_true", help="only rewrite the table and plot from finished cells")
    ap.add_argument("--updates-from", type=int, default=None, metavar="SEED",
                    help="give each cell the update count of the same cell at seed SEED instead of --minutes of "
                         "wall-clock (a like-for-like second seed on a machine of another speed)")
    args = ap.parse_args()
    out = Path(args.out or f"docs/results/leaderboard/{args.teacher}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:  # seed-major: a partial board has every method on its first seed first
        for steps in args.steps:
            for method in args.methods:
                done = out / "cells" / cell_name(method, steps, seed) / "result.json"
                if args.table_only and not done.is_file():
                    continue
                r = run_cell(args.teacher, method, steps, seed, args.minutes, args.num_samples, out,
                             args.updates_from)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "row"} |
                                 ({"fid": round(r["row"]["fid"], 3)} if "row" in r else {})), flush=True)
    teacher = teacher_rows(args.teacher, args.num_samples, out)
    lines = summarise(results)
    (out / "leaderboard.json").write_text(json.dumps({"teacher": TEACHERS[args.teacher], "minutes": args.minutes,
                                                      "command": " ".join(sys.argv), "lines": lines,
                                                      "teacher_rows": teacher}, indent=1))
    (out / "leaderboard.md").write_text(markdown(lines, teacher, args.minutes))
    plot(lines, teacher, out / "leaderboard.png")
    print((out / "leaderboard.md").read_text())


if __name__ == "__main__":
    main()
