"""The GPU benchmark runs on CPU at the tiny SD, SD3 and Flux shapes, so the script that GPU numbers come from stays
working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def test_bench_gpu_runs_at_tiny_shapes(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH), "--shapes", "tiny", "--methods", "dmd2", "--roles", "lora",
           "--warmup", "1", "--steps", "1", "--precision", "bf16", "--optimizer", "adamw8bit", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())
    kinds = ("sd15", "sdxl", "sd3", "flux")
    methods = ("dmd2",)
    assert [(r["shape"], r["method"]) for r in rows] == [(f"tiny:{k}", m) for k in kinds for m in methods]
    assert all("failed" not in r and r["images_per_s"] > 0 and r["peak_gib"] > 0 for r in rows), rows
    assert "| tiny:flux | dmd2 | lora | cpu | bf16 | adamw8bit |" in (tmp_path / "gpu.md").read_text()


def test_leaderboard_runs_a_cell_skips_it_when_done_and_says_why_a_cell_has_no_row(tmp_path: Path) -> None:
    """One 1-step DMD2 cell on the digits teacher under a 2-second budget, the teacher's curve, the table and the plot;
    a second call runs nothing again (the cell's result.json is kept as it was), and a method with no recipe, or a cell
    a method cannot be (TDM at one step), gets a row that says so."""
    board = BENCH.parent / "leaderboard.py"
    cmd = [sys.executable, str(board), "--teacher", "digits", "--minutes", str(2 / 60), "--seeds", "0",
           "--methods", "dmd2", "nosuchmethod", "tdm", "--steps", "1", "--num-samples", "40", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    cell = tmp_path / "cells" / "dmd2_1step_seed0" / "result.json"
    result = json.loads(cell.read_text())
    assert result["row"]["nfe"] == 1 and result["row"]["solver"] == "student" and 0 < result["updates"] < 1000
    assert "fid_pca" in result["row"] and not (cell.parent / "run" / "checkpoints").exists()
    board_md = (tmp_path / "leaderboard.md").read_text()
    assert "| dmd2 | 1 | 1 |" in board_md and "no 1-step recipe for nosuchmethod" in board_md
    assert "TDM at one step is DMD2" in board_md  # a cell a method cannot be says why
    assert (tmp_path / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"
    stamp = cell.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and cell.stat().st_mtime_ns == stamp, again.stderr[-2000:]
    # a second seed with the first seed's update count (a budget in updates: another day's machine runs at another
    # speed), and a seed whose reference cell is missing says so
    second = [*cmd[:cmd.index("--seeds") + 1], "1", *cmd[cmd.index("--seeds") + 2:], "--updates-from", "0"]
    done = subprocess.run(second, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    seed1 = json.loads((tmp_path / "cells" / "dmd2_1step_seed1" / "result.json").read_text())
    assert seed1["updates"] == seed1["budget_updates"] == result["updates"] and "row" in seed1
    missing = [*cmd[:cmd.index("--seeds") + 1], "2", *cmd[cmd.index("--seeds") + 2:], "--updates-from", "7"]
    done = subprocess.run(missing, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "no finished seed-7 cell" in (tmp_path / "leaderboard.md").read_text()


def test_digits_steps_reads_each_step_of_a_finished_run(tmp_path: Path) -> None:
    """bench/digits_steps.py on a 4-step digits TDM run of a few updates: one row per student step, the last step's
    FID per class."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill_diffusion.cli", "distill", "configs/digits_tdm.yaml", "--out", str(run),
           "train.steps=5", "tdm.critic_updates=1", "train.progress=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(BENCH.parent / "digits_steps.py"), str(run), "--num-samples", "40", "--out", str(out),
           "--continuation", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    rows, continued = rows[:4], rows[4:]  # then, from steps 2-4's own inputs, the student and the teacher's DDIM-2
    assert [(r["step"], r["who"]) for r in continued] == [
        (k, who) for k in (2, 3, 4) for who in ("student", "teacher DDIM-2, CFG 2")]
    assert all(r["fid"] > 0 and 0 < r["mean_pixel"] < 1 for r in continued)
    assert [(r["step"], r["t"]) for r in rows] == [(1, 999.0), (2, 749.0), (3, 499.0), (4, 249.0)]
    assert all(r["fid"] > r["mean_term"] >= 0 and 0 <= r["prompt_accuracy"] <= 1 for r in rows)
    assert len(rows[-1]["fid_per_class"]) == 10 and "fid_per_class" not in rows[0]
    assert "| run | step |" in done.stdout
