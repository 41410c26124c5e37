"""Data parallelism through accelerate: two CPU processes over gloo (``ACCELERATE_USE_CPU=1 accelerate launch
--multi_gpu --num_processes 2``; plain ``--cpu`` would silently run one process) with a global batch 2B train what
one process with batch 2B trains, and their checkpoints resume in one process."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from distill_diffusion.config import load_config
from distill_diffusion.trainer import Trainer

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gmm_dmd2.yaml"
OVERRIDES = ["train.batch_size=64", "train.checkpoint_every=6", "dmd2.critic_updates=2", "train.ema_decay=0.9",
             "train.progress=false", "train.eval_samples=200"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_error(r: subprocess.CompletedProcess) -> str:
    """Each process's own error lines first (a crash on one rank shows on the other only as a closed connection),
    then the end of stderr."""
    own = [line for line in r.stderr.splitlines() if "Error" in line and "[rank" in line]
    return "\n".join(own[-20:]) + "\n...\n" + r.stderr[-1500:]


def launch_two(run: Path, *overrides: str, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "distill_diffusion.cli", "distill", str(CONFIG), "--out", str(run), *OVERRIDES, *overrides]
    def limit() -> None:  # writes past this size fail as on a full disk (EFBIG); inherited by both processes
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=limit if max_file_bytes else None)


def test_two_processes_equal_one_with_the_global_batch_and_resume_in_one(tmp_path: Path) -> None:
    two = tmp_path / "two"
    r = launch_two(two, "train.steps=6")
    assert r.returncode == 0, launch_error(r)

    one = tmp_path / "one"
    Trainer(load_config(CONFIG, [*OVERRIDES, "train.steps=12"]), one).train()
    first = one / "checkpoints" / "step_00000006" / "model.safetensors"
    a, b = load_file(str(first)), load_file(str(two / "checkpoints" / "step_00000006" / "model.safetensors"))
    later = load_file(str(one / "checkpoints" / "step_00000012" / "model.safetensors"))
    moved = max((a[k] - later[k]).abs().max().item() for k in a)  # how far six steps move the weights
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3 and diff <= 1e-5 * max(1.0, moved), (diff, moved)  # trained, and trained the same

    # the 2-process checkpoint resumes in one process and ends where the 1-process run ends
    Trainer(load_config(CONFIG, [*OVERRIDES, "train.steps=12"]), two, resume=True).train()
    for name in ("final/student.safetensors", "final/student_ema.safetensors"):
        wa, wb = load_file(str(one / name)), load_file(str(two / name))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5, name


def test_a_global_batch_that_does_not_split_evenly_is_refused(tmp_path: Path) -> None:
    r = launch_two(tmp_path / "run", "train.steps=2", "train.batch_size=63")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("distill-diffusion: error:")]
    assert lines and "train.batch_size 63" in lines[0] and "multiple of 2" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_checkpoint_failing_on_one_process_stops_both_with_one_line(tmp_path: Path) -> None:
    """Process 0 writes the weights (over the 100 kB limit: it fails), process 1 only its RNG file (it succeeds): both
    must agree and stop with the same one-line error, not wait forever at a barrier the other never reaches."""
    r = launch_two(tmp_path / "run", "train.steps=6", max_file_bytes=100_000)
    assert r.returncode != 0
    # one line from each process (their stderr may interleave on one line, so the messages are counted, not lines)
    errors = re.findall(r"distill-diffusion: error: (.*?)(?=distill-diffusion: error:|\n|$)", r.stderr)
    assert len(errors) == 2, r.stderr[-3000:]
    assert all("could not write checkpoint step_00000006" in e for e in errors), errors
    assert any("another process failed to write its part" in e for e in errors), errors
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir()]  # nothing half-written is left
