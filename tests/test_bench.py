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
