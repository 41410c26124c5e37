"""Tests for distill_diffusion.eval.fid, the feature-space arithmetic: Frechet distance and FID against closed forms
and torchmetrics, cached statistics, KID (raw and standardised), precision / recall, and the pixel-PCA space.

Everything is offline: feature spaces are small fixed random conv nets (clean-fid's Inception and torch-fidelity's
weights need downloads). Generation, CLIP score and the sweep are in test_eval.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from distill_diffusion.eval.fid import (
    FeatureStats,
    PixelPCA,
    cached_stats,
    extract,
    feature_backend,
    fid,
    fid_from_stats,
    frechet_distance,
    kid,
    precision_recall,
)


class RandomConvFeatures(nn.Module):
    """A fixed random feature map: float images (B, 3, 16, 16) in [0, 1] -> (B, dim)."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 7 * 7, dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class FromUint8(nn.Module):
    """What torchmetrics hands a custom feature module (with ``normalize=False``) is the ``update`` tensor itself,
    uint8 (B, 3, H, W) in 0..255, unresized; this maps it to what ``eval.fid.extract`` gives the same net
    (``x.float() / 255``) and records every input it sees."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.seen: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((x.dtype, tuple(x.shape)))
        return self.net(x.float() / 255.0)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID with Tr((S1^1/2 S2 S1^1/2)^1/2) from symmetric eigen-decompositions instead of sqrtm(S1 S2)."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r = _sqrt_psd(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _closed_form(mu1: np.ndarray, a: np.ndarray, mu2: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of Gaussians whose covariances share eigenvectors, with eigenvalues a and b."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def _image_sets(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two sets of uint8 (n, 16, 16, 3) images: uniform noise, and a darker-contrast, brighter version of it."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    fake = np.clip(rng.integers(0, 256, (n, 16, 16, 3)) * 0.8 + 40, 0, 255).astype(np.uint8)
    return real, fake


# ------------------------------------------------------------------------------------------------ Frechet distance
def test_frechet_distance_diagonal_gaussians_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    want = _closed_form(mu1, a, mu2, b)
    assert want > 1
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, abs=1e-8)
    # one dimension as full 1x1 matrices: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance(np.array([1.0, 0.0]), np.diag([4.0, 1.0]), np.array([3.0, 0.0]),
                            np.diag([9.0, 1.0])) == pytest.approx(4.0 + 1.0, abs=1e-8)


def test_frechet_distance_commuting_covariances_closed_form_symmetric_and_zero() -> None:
    rng = np.random.default_rng(1)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert np.abs(s1 @ s2 - s2 @ s1).max() < 1e-12  # they commute but are far from diagonal
    assert np.abs(s1 - np.diag(np.diag(s1))).max() > 0.1
    want = _closed_form(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, abs=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(want, abs=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # a general (non-commuting) pair: symmetric, zero against itself, and equal to the eigen-based reference
    x, y = rng.normal(size=(200, d)), 0.5 + rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) / 3
    sx, sy = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert fid_from_stats(sx, sy) == pytest.approx(fid_from_stats(sy, sx), rel=1e-10)
    assert fid_from_stats(sx, sy) == pytest.approx(_reference_fid(x, y), rel=1e-8)
    assert fid_from_stats(sy, sy) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_frechet_distance_one_dimensional() -> None:
    # N(1, 4) vs N(3, 9): (1-3)^2 + (2-3)^2 = 5
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(5)


# ------------------------------------------------------------------------------------------------ FID from images
def test_fid_matches_eigen_reference_and_torchmetrics_with_the_same_feature_net() -> None:
    real, fake = _image_sets()
    net = RandomConvFeatures(dim=32)
    feat = feature_backend(net)
    f_real, f_fake = extract(real, feat, batch_size=128), extract(fake, feat, batch_size=128)
    assert f_real.shape == (300, 32) and f_real.dtype == torch.float64
    reference = FeatureStats.from_features(f_real)
    ours = fid(fake, reference, feat)
    assert ours == pytest.approx(fid_from_stats(FeatureStats.from_features(f_fake), reference), rel=1e-12)
    assert ours > 1  # the two sets are far apart in this feature space

    # 1. an independent computation from the same features
    assert ours == pytest.approx(_reference_fid(f_fake.numpy(), f_real.numpy()), rel=1e-6)

    # 2. torchmetrics with the same net behind a uint8 -> [0, 1] wrapper
    wrapped = FromUint8(net)
    metric = FrechetInceptionDistance(feature=wrapped, input_img_size=(3, 16, 16))
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    theirs = float(metric.compute())
    assert theirs == pytest.approx(ours, rel=1e-3)
    # one dummy call to infer the feature width, then each update's tensor untouched: uint8 NCHW, not resized
    assert wrapped.seen == [(torch.uint8, (1, 3, 16, 16)), (torch.uint8, (300, 3, 16, 16)),
                            (torch.uint8, (300, 3, 16, 16))]


def test_feature_stats_save_load_round_trip(tmp_path: Path) -> None:
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(size=(50, 6)))
    path = tmp_path / "sub" / "ref.npz"
    stats.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as d:
        assert sorted(d.files) == ["features", "mu", "sigma"]
    loaded = FeatureStats.load(path)
    assert loaded.n == 50
    for name in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
        assert getattr(loaded, name).dtype == np.float64
    np.testing.assert_allclose(loaded.sigma, np.cov(loaded.features, rowvar=False), rtol=1e-12)


def test_cached_stats_computes_once_then_loads(tmp_path: Path) -> None:
    images, _ = _image_sets(n=40)
    net = RandomConvFeatures(dim=8)
    calls = []

    def counting(x: Tensor) -> Tensor:
        calls.append(len(x))
        return net(x)

    cache = tmp_path / "ref.npz"
    first = cached_stats(images, counting, cache)
    assert sum(calls) == 40 and cache.is_file()
    second = cached_stats(images, counting, cache)
    assert sum(calls) == 40  # loaded, not recomputed
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.sigma, first.sigma)
    cached_stats(images, counting, None)
    assert sum(calls) == 80  # no cache: computed every time


# ------------------------------------------------------------------------------------------------ KID
def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy = k(x, x), k(y, y)
    off = lambda s: (s.sum() - np.trace(s)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * k(x, y).sum() / m**2)


def test_kid_near_zero_for_one_distribution_positive_for_a_shift_and_deterministic() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kid(a, b, subsets=50, subset_size=100, seed=0)
    shifted, _ = kid(a, b + 0.5, subsets=50, subset_size=100, seed=0)
    assert shifted > 0.5
    assert abs(same) < 0.05 * shifted
    assert kid(a, b + 0.5, subsets=50, subset_size=100, seed=0) == kid(a, b + 0.5, subsets=50, subset_size=100,
                                                                          seed=0)
    assert kid(a, b, subsets=50, subset_size=100, seed=1) != kid(a, b, subsets=50, subset_size=100, seed=0)
    # subsets as large as the sets are the sets themselves: the exact unbiased MMD^2, no spread
    mean, std = kid(a, b + 0.5, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_unbiased_mmd2(a, b + 0.5), rel=1e-10)
    assert std < 1e-10


# ------------------------------------------------------------------------------------------------ precision / recall
def test_precision_recall_exact_on_points_and_the_signs_of_collapse_and_shift() -> None:
    # k = 1 by hand: real radii 1, 1, 1, 1, 7; fake radii 2.4, 17.1, 2.4. 0.5 and 2.9 fall in real balls, 20 does not
    # (10 from the point 10, whose radius is 7); every real point lies in some fake ball (10 in 20's)
    real, fake = np.array([[0.0], [1], [2], [3], [10]]), np.array([[0.5], [20], [2.9]])
    assert precision_recall(fake, real, k=1) == (pytest.approx(2 / 3), 1.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    p_same, r_same = precision_recall(a, b)
    assert p_same > 0.6 and r_same > 0.6  # one distribution: both high
    p_narrow, r_narrow = precision_recall(0.5 * a, b)  # a mode-seeking generator: faithful but narrow
    assert p_narrow > p_same and r_narrow < 0.2
    assert precision_recall(a + 3, b) == (0.0, 0.0)  # far off: neither
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(a[:3], b)


# ------------------------------------------------------------------------------------------------ KID scale, pixel PCA
def test_pixel_pca_is_built_from_the_reference_and_sees_what_it_holds() -> None:
    """The second feature space: the reference against itself is 0; a brightness shift and a blur, which a
    classifier's features may ignore, each move the pixel-PCA FID away from 0; the space is fixed by the reference."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(200, 3, 8, 8, generator=g) * torch.linspace(0.2, 1, 8)  # a column gradient: structured pixels
    pca = PixelPCA(ref, k=16, size=8)
    assert pca.axes.shape == (16, 3 * 8 * 8)
    torch.testing.assert_close(pca.axes @ pca.axes.T, torch.eye(16, dtype=torch.float64))  # orthonormal axes
    stats = FeatureStats.from_features(extract(ref, pca))
    assert abs(fid_from_stats(stats, stats)) < 1e-6
    other = torch.rand(200, 3, 8, 8, generator=g) * torch.linspace(0.2, 1, 8)
    same = fid_from_stats(FeatureStats.from_features(extract(other, pca)), stats)
    brighter = fid_from_stats(FeatureStats.from_features(extract((other + 0.3).clamp(0, 1), pca)), stats)
    blurred = fid_from_stats(FeatureStats.from_features(extract(
        torch.nn.functional.avg_pool2d(other, 3, 1, 1, count_include_pad=False), pca)), stats)
    assert brighter > 3 * same and blurred > 3 * same, (same, brighter, blurred)
    # uint8 NHWC images of another size are resized into the same space
    as_uint8 = (ref.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    assert extract(as_uint8, PixelPCA(ref, k=16, size=4)).shape == (200, 16)


def test_kid_standardised_is_scale_free_and_the_raw_kernel_is_not() -> None:
    """The cubic kernel (x.y / d + 1)^3 assumes unit-scale features: scaled by 10, the raw KID of the same two sets
    changes by orders of magnitude, the standardised one not at all (what the sweep reports)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, (300, 8)), rng.normal(0, 1, (300, 8))
    raw1, raw10 = kid(a, b, subsets=10, subset_size=200)[0], kid(10 * a, 10 * b, subsets=10, subset_size=200)[0]
    std1 = kid(a, b, subsets=10, subset_size=200, standardise=True)
    std10 = kid(10 * a, 10 * b, subsets=10, subset_size=200, standardise=True)
    assert raw10 > 100 * raw1 > 0
    assert std1[0] == pytest.approx(std10[0], rel=1e-6) and std1[1] == pytest.approx(std10[1], rel=1e-6)
    assert std1[0] > 3 * std1[1] > 0  # a 0.3-std shift in every dimension is seen, beyond its spread
