"""`distill-diffusion run`: distill -> export -> sweep -> report, end to end on the embedded teacher (small)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_job_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill_diffusion.cli", "run", "configs/digits_dmd2.yaml", "--out", str(out),
           "train.steps=4", "train.batch_size=4", "train.progress=false", "dmd2.critic_updates=1",
           "eval.num_samples=24", "eval.nfe=[1,4]", "eval.teacher_cfg=[1,2]", "eval.grid_prompts=3",
           "eval.grid_seeds=2", "eval.grid_teacher_steps=4", "eval.batch_size=12"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    rows = json.loads((out / "sweep" / "sweep.json").read_text())["rows"]
    student = [row for row in rows if row["solver"] == "student"]
    teacher = [row for row in rows if row["solver"] == "ddim"]
    # the student row is the export, sampled on its own 4 timesteps; the teacher rows are its DDIM sweep
    assert len(student) == 1 and student[0]["nfe"] == 4 and student[0]["model"].endswith("export")
    assert sorted((row["guidance"], row["nfe"]) for row in teacher) == [(1.0, 1), (1.0, 4), (2.0, 4)]
    assert all(0 <= row["prompt_accuracy"] <= 1 and row["fid"] > 0 for row in rows)
    for name in ("grid_teacher.png", "grid_student.png", "sweep/fid_vs_nfe.png", "export/model_index.json"):
        assert (out / name).is_file(), name
    assert "| model | solver |" in report and "grid_student.png" in report and "pipe(prompt)" in report
    assert "Wall time: distill " in report  # this call trained it (a --resume of a finished run says it did not)
    card = (out / "export" / "README.md").read_text()
    assert "| model | solver |" in card and "CreativeML" in card  # the card carries this student's sweep table
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["call"] == {} and info["pipeline_class"] == "LatentConsistencyModelPipeline"
