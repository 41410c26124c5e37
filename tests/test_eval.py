"""Tests for distill_diffusion.eval beyond the feature-space arithmetic (test_metrics.py): CLIP score, generation,
the sweep and its verdicts.

Everything is offline: the sweep's feature space is a small fixed random conv net (test_metrics.RandomConvFeatures),
the CLIP model is open_clip's ViT-B-32 with random weights, and images come from the tiny sd15 pipeline of
``conftest.tiny_dirs``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from PIL import Image
from test_metrics import RandomConvFeatures

from distill_diffusion.errors import ConfigError
from distill_diffusion.eval.clip_score import ClipScorer
from distill_diffusion.eval.generate import SOLVERS, EvalModel, generate, make_scheduler
from distill_diffusion.eval.sweep import run_sweep, verdicts

PROMPTS = ["a photo of a cat", "a red car", "a dog", "a green tree"]


# ------------------------------------------------------------------------------------------------ CLIP score
def test_clip_score_random_vit_b_32() -> None:
    scorer = ClipScorer("ViT-B-32", pretrained=None)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    scores = scorer.per_image(images, PROMPTS)
    assert scores.shape == (4,) and np.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()
    np.testing.assert_array_equal(scorer.per_image(images, PROMPTS), scores)
    np.testing.assert_allclose(scorer.per_image(images, PROMPTS, batch_size=3), scores, atol=1e-3)
    assert scorer(images, PROMPTS) == pytest.approx(float(scores.mean()), abs=1e-5)
    with pytest.raises(ValueError, match="3 prompts"):
        scorer.per_image(images, PROMPTS[:3])


# ------------------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def sd15(tiny_dirs: dict[str, str]) -> Iterator[EvalModel]:
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs["sd15"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    yield EvalModel("sd15", pipeline=pipe)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("solver", SOLVERS)
def test_generate_per_image_seeds(sd15: EvalModel, solver: str, steps: int) -> None:
    images, seconds = generate(sd15, PROMPTS, [0, 1, 2, 3], steps, solver=solver, batch_size=1, progress=False)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert seconds > 0
    batched, _ = generate(sd15, PROMPTS, [0, 1, 2, 3], steps, solver=solver, batch_size=4, progress=False)
    # the same images in a batch of 4: equal up to a CPU kernel's batch-size rounding, which can tip a pixel by one
    # level on some processors (measured: 1 of 3072 values on one machine, none on another)
    diff = np.abs(batched.astype(int) - images)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    other, _ = generate(sd15, PROMPTS, [4, 5, 6, 7], steps, solver=solver, batch_size=4, progress=False)
    for i in range(4):
        assert np.abs(other[i].astype(int) - images[i]).mean() > 5


def test_generate_with_guidance_is_batch_invariant_and_checks_lengths(sd15: EvalModel) -> None:
    one, _ = generate(sd15, PROMPTS, [0, 1, 2, 3], 1, cfg_scale=2.0, batch_size=1, progress=False)
    four, _ = generate(sd15, PROMPTS, [0, 1, 2, 3], 1, cfg_scale=2.0, batch_size=4, progress=False)
    np.testing.assert_array_equal(one, four)
    with pytest.raises(ValueError, match="same length"):
        generate(sd15, PROMPTS, [0, 1], 1, progress=False)


def test_make_scheduler_trailing_spacing_and_unknown_solver(sd15: EvalModel) -> None:
    config = sd15.pipeline.scheduler.config
    for solver in SOLVERS:
        scheduler = make_scheduler(solver, config)
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == [999, 749, 499, 249], solver
    with pytest.raises(ValueError, match="ddim"):
        make_scheduler("heun", config)


# ------------------------------------------------------------------------------------------------ sweep
def _write_reference(folder: Path, n: int, sizes: tuple[int, ...] = (16,)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        size = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_run_sweep_end_to_end(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    ref = tmp_path / "ref"
    _write_reference(ref, 40)
    out = tmp_path / "out"
    # 8 features so that 16 samples give a full-rank covariance
    rows = run_sweep([tiny_dirs["sd15"]], str(ref), nfes=[1, 2], solvers=["ddim"], teacher_cfgs=[1.0, 2.0],
                     num_samples=16, out_dir=out, features=RandomConvFeatures(dim=8), prompts=PROMPTS[:2],
                     cache_dir=tmp_path / "cache", progress=False)
    # CFG 2 costs two NFEs a step: skipped at NFE 1, one step at NFE 2
    assert [(r["guidance"], r["steps"], r["nfe"]) for r in rows] == [(1.0, 1, 1), (1.0, 2, 2), (2.0, 1, 2)]
    for r in rows:
        assert r["solver"] == "ddim" and r["n"] == 16
        assert np.isfinite(r["fid"]) and r["fid"] > 0 and np.isfinite(r["kid"]) and r["kid_std"] >= 0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        # the second feature space: pixel PCA of the reference images
        assert np.isfinite(r["fid_pca"]) and r["fid_pca"] > 0 and 0 <= r["recall_pca"] <= 1
        assert r["ms_per_image"] > 0
        assert r["images_per_s"] == pytest.approx(1000 / r["ms_per_image"])
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["reference_n"] == 40 and saved["rows"] == rows
    md = (out / "sweep.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(rows) and "FID" in md[0] and "FID pca" in md[0]
    assert (out / "fid_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_run_sweep_rejects_bad_reference_folders(tmp_path: Path, tiny_dirs: dict[str, str]) -> None:
    kwargs = dict(nfes=[1], solvers=["ddim"], teacher_cfgs=[1.0], num_samples=4, features=RandomConvFeatures(dim=8),
                  prompts=PROMPTS, progress=False)
    mixed = tmp_path / "mixed"
    _write_reference(mixed, 4, sizes=(16, 24))
    with pytest.raises(ConfigError, match="size"):
        run_sweep([tiny_dirs["sd15"]], str(mixed), out_dir=tmp_path / "out1", **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no .png"):
        run_sweep([tiny_dirs["sd15"]], str(empty), out_dir=tmp_path / "out2", **kwargs)


def test_multistep_student_images_do_not_depend_on_the_batch() -> None:
    """Start noise and every re-noising of image i come from seeds[i] alone, as for the teacher pipelines."""
    from conftest import make_config

    from distill_diffusion.assembly import assemble

    model = EvalModel("student", run=assemble(make_config("dmd2", "tiny:sd15", model={"timesteps": [999, 499]}),
                                              train=False))
    prompts = ["a photo of a cat"] * 4
    one, _ = generate(model, prompts, [0, 1, 2, 3], batch_size=1, progress=False)
    four, _ = generate(model, prompts, [0, 1, 2, 3], batch_size=4, progress=False)
    np.testing.assert_array_equal(one, four)
    assert np.abs(one[0].astype(int) - one[1]).max() > 0


def test_verdicts_say_when_the_feature_spaces_disagree() -> None:
    row = {"model": "m", "solver": "student", "guidance": 1.0, "steps": 4, "nfe": 4}
    a = {**row, "fid": 3.0, "fid_pca": 5.0}
    b = {**row, "model": "t", "solver": "ddim", "fid": 4.0, "fid_pca": 4.0}
    (said,) = verdicts(a, b)
    assert said.startswith("The feature spaces disagree") and "first better" in said and "second better" in said
    (said,) = verdicts(a, {**b, "fid_pca": 6.0})
    assert said.startswith("m (student") and "better in every feature space" in said
    (said,) = verdicts(a, {**b, "fid": 2.0, "fid_pca": 1.0})
    assert said.startswith("t (ddim")
