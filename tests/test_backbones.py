"""Further feature spaces (`eval.backbones`): DINOv2 and CLIP image features, in the sweep beside the primary space and
pixel PCA.

Offline: the backbones are tiny DINOv2 / CLIP vision models built from config with seeded random weights and saved
as local directories (what a user passes as ``dinov2:DIR``); the real ones load the same way from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import PROMPTS, _write_reference
from test_metrics import RandomConvFeatures

from distill_diffusion.errors import ConfigError
from distill_diffusion.eval.backbones import Backbone, parse_spec
from distill_diffusion.eval.fid import FeatureStats, extract, fid_from_stats
from distill_diffusion.eval.sweep import run_sweep, verdicts


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224,
                 patch_size=32)
    Dinov2Model(Dinov2Config(**small)).save_pretrained(root / "dinov2")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=16)).save_pretrained(root / "clip")
    return {"dinov2": str(root / "dinov2"), "clip": str(root / "clip")}


@pytest.mark.parametrize("kind,dim", [("dinov2", 32), ("clip", 16)])
def test_backbone_features_are_the_models_own_at_224(kind: str, dim: int, backbone_dirs: dict[str, str]) -> None:
    net = Backbone(f"{kind}:{backbone_dirs[kind]}")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = net(images)
    assert feats.shape == (3, dim) and torch.isfinite(feats).all()
    # by hand: bicubic to 224, the family's normalisation, the model's pooled CLS / projected embedding
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
    out = net.net(pixel_values=(x - net.mean) / net.std)
    torch.testing.assert_close(feats, out.pooler_output if kind == "dinov2" else out.image_embeds)
    torch.testing.assert_close(net(images[:1]), feats[:1], atol=1e-5, rtol=1e-4)  # per image, not per batch
    same = FeatureStats.from_features(extract(images.repeat(4, 1, 1, 1) + 0, net))
    assert fid_from_stats(same, same) == pytest.approx(0, abs=1e-6)


def test_backbone_specs_and_errors_are_one_line(tmp_path: Path) -> None:
    assert parse_spec("dinov2") == ("dinov2", "facebook/dinov2-large")
    assert parse_spec("clip:/x/y") == ("clip", "/x/y")
    with pytest.raises(ConfigError, match="unknown feature backbone 'inception'"):
        parse_spec("inception")
    from distill_diffusion.config import EvalConfig

    with pytest.raises(ConfigError, match="unknown feature backbone"):  # a run's config: refused at load
        EvalConfig(extra_features=["dinov2", "inception"])
    with pytest.raises(ConfigError, match="twice"):
        EvalConfig(extra_features=["dinov2", "dinov2:/x"])
    with pytest.raises(ConfigError, match="could not be loaded") as e:
        Backbone(f"dinov2:{tmp_path / 'missing'}")
    assert "\n" not in str(e.value)


def test_sweep_measures_in_every_space_asked_for(tmp_path: Path, tiny_dirs: dict[str, str],
                                                   backbone_dirs: dict[str, str]) -> None:
    ref = tmp_path / "ref"
    _write_reference(ref, 40)
    extra = [f"dinov2:{backbone_dirs['dinov2']}", f"clip:{backbone_dirs['clip']}"]
    kwargs = dict(nfes=[1, 2], solvers=["ddim"], teacher_cfgs=[1.0], num_samples=16,
                  features=RandomConvFeatures(dim=8), prompts=PROMPTS[:2], progress=False)
    rows = run_sweep([tiny_dirs["sd15"]], str(ref), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                     extra_features=extra, **kwargs)
    for r in rows:
        for sfx in ("", "_pca", "_dinov2", "_clip"):
            assert np.isfinite(r[f"fid{sfx}"]) and r[f"fid{sfx}"] > 0 and 0 <= r[f"recall{sfx}"] <= 1
    assert rows[0]["fid_dinov2"] != rows[0]["fid_clip"]
    md = (tmp_path / "out" / "sweep.md").read_text().splitlines()[0]
    assert "FID pca" in md and "FID dinov2" in md and "FID clip" in md
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"] == rows
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # primary, DINOv2 and CLIP reference statistics
    said = " ".join(verdicts(rows[0], rows[1]))
    assert "DINOv2 FID" in said and "CLIP FID" in said and "pixel-PCA FID" in said
    # a second run reads the cached reference statistics and measures the same
    again = run_sweep([tiny_dirs["sd15"]], str(ref), out_dir=tmp_path / "out2", cache_dir=tmp_path / "cache",
                      extra_features=extra, **kwargs)
    assert [r["fid_dinov2"] for r in again] == pytest.approx([r["fid_dinov2"] for r in rows], rel=1e-6)
    with pytest.raises(ConfigError, match="once"):
        run_sweep([tiny_dirs["sd15"]], str(ref), out_dir=tmp_path / "out3", extra_features=extra[:1] * 2, **kwargs)
    assert not (tmp_path / "out3").exists()
