"""The command line as a user runs it: a subprocess per command, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill_diffusion.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_distill_then_sample_the_mixture(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = cli("distill", "configs/gmm_dmd2.yaml", "--out", str(run), "train.steps=60", "train.checkpoint_every=30",
            "train.eval_samples=200", "train.progress=false")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 60
    assert (run / "final" / "student.safetensors").is_file() and (run / "config.yaml").is_file()
    out = tmp_path / "samples"
    r = cli("sample", str(run), "--out", str(out), "--num-samples", "400")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"energy_distance", "std_ratio", "coverage"}
    assert (out / "samples.png").is_file() and (out / "samples.safetensors").is_file()


def test_distill_and_sample_a_tiny_sd_student(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"method: dmd2\nmodel:\n  teacher: {tiny_dirs['sd15']}\n  timesteps: [999, 499]\n"
                   "train:\n  steps: 4\n  batch_size: 2\n  progress: false\n")
    r = cli("distill", str(cfg), "--out", str(run))
    assert r.returncode == 0, r.stderr
    assert (run / "final" / "samples" / "grid.png").is_file()
    out = tmp_path / "samples"
    r = cli("sample", str(run), "--out", str(out), "--prompt", "a handwritten digit two", "--prompt",
            "a photo of a cat", "--num-per-prompt", "2")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all((out / x["file"]).is_file() for x in lines)
    assert lines[0]["prompt"] == "a handwritten digit two" and lines[0]["timesteps"] == [999, 499]


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "configs/gmm_dmd2.yaml", "method=dmd3"],
         "unknown method 'dmd3'; choose one of: add, consistency, dmd2"),
        (["distill", "configs/gmm_dmd2.yaml", "train.stepz=3"], "unknown key train.stepz; valid keys: steps"),
        (["distill", "configs/gmm_dmd2.yaml", "model.timesteps=[499, 999]"], "strictly descending"),
        (["distill", "configs/gmm_dmd2.yaml", "model.timesteps=[1000]"], "out of range"),
        (["distill", "configs/gmm_dmd2.yaml", "model.teacher=/nonexistent/sd15"], "is not a directory"),
        (["distill", "configs/nope.yaml"], "not found"),
        (["sample", "/nonexistent/run", "--out", "x"], "is neither embedded:<name>, a diffusers"),
    ],
)
def test_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a if a != "x" else str(tmp_path / "x") for a in args]
    r = cli(*args, "--out", str(tmp_path / "out")) if args[0] == "distill" else cli(*args)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and message in err, err
    assert err.startswith("distill-diffusion: error:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "embedded:digits", "--out", "x", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["sample", "embedded:digits", "--out", "x", "--num-per-prompt", "0"],
         "argument --num-per-prompt: must be >= 1"),
        (["sample", "embedded:digits", "--out", "x", "--guidance", "nan"],
         "argument --guidance: must be >= 0, got nan"),
        (["sample", "embedded:digits", "--out", "x", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", "x", "--nfe", "0,2"],
         "argument --nfe: must be >= 1, got 0"),
        (["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", "x", "--nfe", "1,two"],
         "argument --nfe: 'two' is not an integer"),
        (["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", "x", "--num-samples", "0"],
         "argument --num-samples: must be >= 1, got 0"),
        (["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", "x", "--guidance", "1,-2"],
         "argument --guidance: must be >= 0, got -2"),
        (["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", "x", "--batch-size", "0"],
         "argument --batch-size: must be >= 1"),
        (["zoo", "train-digits", "x", "--lr", "0"], "argument --lr: must be > 0, got 0"),
        (["zoo", "train-digits", "x", "--unet-steps", "0"], "argument --unet-steps: must be >= 1"),
        (["sample", "embedded:digits"], "the following arguments are required: --out"),
        (["distill", "configs/gmm_dmd2.yaml", "--out", "x", "dmd2.lr_student=.nan"],
         "dmd2.lr_student must be a finite number, got nan"),
        (["distill", "configs/gmm_dmd2.yaml", "--out", "x", "train.grad_clip=-1"],
         "train.grad_clip must be >= 0 (0: no clipping), got -1.0"),
        (["distill", "configs/gmm_dmd2.yaml", "--out", "x", "train.max_seconds=-5"],
         "train.max_seconds must be >= 0 (0: no limit), got -5.0"),
        (["distill", "configs/gmm_scm.yaml", "--out", "x", "scm.jvp=finite_difference", "train.mixed_precision=bf16"],
         "scm.jvp finite_difference subtracts two network calls a step of 0.0001 x t apart, which half precision "
         "cannot resolve"),
        (["distill", "configs/gmm_scm.yaml", "--out", "x", "scm.jvp=forward"],
         "unknown scm.jvp 'forward'; choose one of: autograd, finite_difference"),
        (["distill", "configs/gmm_dmd2.yaml", "--out", "x", "data.prompt_file=prompts.txt"],
         "the mixture teacher (gmm) is conditioned on class labels, not prompts"),
        (["eval", "sweep", "embedded:digits", "--ref", "/nonexistent/ref", "--out", "x"],
         "reference '/nonexistent/ref' is neither 'digits', a folder of images nor a .npz of statistics"),
        (["eval", "sweep", "embedded:digits", "--ref", "/nonexistent/ref.npz", "--out", "x"],
         "reference statistics '/nonexistent/ref.npz' not found"),
        (["data", "encode-prompts", "configs/digits_dmd2.yaml", "--out", "x"], "data.prompt_file is not set"),
        (["data", "encode-images", "configs/digits_dmd2.yaml", "--out", "x", "data.real=digits"],
         "`digits` needs no cache"),
        (["data", "encode-prompts", "configs/gmm_dmd2.yaml", "--out", "x", "data.prompt_file=p.txt"],
         "the mixture teacher (gmm) has no text encoder or VAE"),
        (["data", "encode-prompts", "configs/digits_dmd2.yaml", "--out", "x", "data.prompt_file=/none/p.txt"],
         "data.prompt_file '/none/p.txt' not found"),
        (["data", "encode-prompts", "configs/digits_dmd2.yaml", "--out", "x", "--dtype", "int8",
          "data.prompt_file=README.md"], "unknown kind of file '.md'"),
        (["data", "verify", "x"], "is not a finished cache (no cache.json)"),
        (["distill", "configs/digits_dmd2.yaml", "--out", "x", "data.workers=-1"], "data.workers must be >= 0"),
        (["distill", "configs/digits_dmd2.yaml", "--out", "x", "data.real=digits", "data.real_cache=c"],
         "data.real and data.real_cache are both set"),
        (["distill", "configs/digits_dmd2.yaml", "--out", "x", "data.prompt_cache=/none/cache"],
         "data.prompt_cache '/none/cache' is not a finished cache"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_anything_runs(tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    args = [a if a != "x" else str(tmp_path / "x") for a in args]
    r = cli(*args)
    err = r.stderr.strip()
    assert r.returncode == 2 and err == f"distill-diffusion: error: {err.split('error: ', 1)[1]}", err
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "x").exists()


def test_out_naming_a_file_is_refused_by_every_command(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("keep")
    for args in (["sample", "embedded:digits", "--out", str(file), "--prompt", "a handwritten digit one"],
                 ["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", str(file)],
                 ["eval", "sweep", "embedded:digits", "--ref", "digits", "--out", str(tmp_path / "o"), "--cache-dir",
                  str(file)],
                 ["distill", "configs/gmm_dmd2.yaml", "--out", str(file)],
                 ["zoo", "train-digits", str(file)]):
        r = cli(*args)
        err = r.stderr.strip()
        assert r.returncode == 2 and "is a file, not a directory" in err and "\n" not in err, err
        assert file.read_text() == "keep" and not (tmp_path / "o").exists()


def test_distill_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli("distill", "configs/gmm_dmd2.yaml", "--out", str(out), "train.steps=3")
    assert r.returncode == 2 and "not empty" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
