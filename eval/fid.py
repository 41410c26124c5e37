"""FID, KID and precision / recall over any feature space, with reference statistics cached as ``.npz``.

FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), the matrix square root by
``scipy.linalg.sqrtm`` as pytorch-fid and clean-fid compute it. KID (Binkowski et al. 2018): the unbiased MMD^2 with
the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Precision and recall
(Kynkaanniemi et al. 2019, "Improved precision and recall", k = 3): the fraction of generated samples inside the
real samples' k-NN balls (fidelity), and of real samples inside the generated samples' balls (coverage of the
real distribution). FID mixes the two; a mode-seeking student shows as high precision, low recall.

Feature backends (`feature_backend`):
- ``"clean"``: clean-fid's Inception-V3 with its anti-aliased "clean" resize (the GigaGAN / DMD2 / SiD protocol;
  needs the Inception weights, which clean-fid downloads once: use it on a networked GPU machine);
- ``"torchmetrics"``: torchmetrics' FID Inception (torch-fidelity weights, likewise downloaded once);
- any ``nn.Module``: its ``features(images)`` method if it has one, else ``module(images)``; for example the
  package's digits classifier, which works offline.

Images everywhere are uint8 arrays (N, H, W, 3), as diffusers pipelines return with ``output_type="np"`` scaled to
0..255, or float tensors (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn
from tqdm.auto import tqdm

from distill_diffusion.errors import ConfigError, first_line

FeatureFn = Callable[[Tensor], Tensor]  # float (B, 3, H, W) in [0, 1] -> (B, D)


def as_float_images(images: np.ndarray | Tensor) -> Tensor:
    """uint8 NHWC (array or tensor) or float NCHW in [0, 1] -> float NCHW in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 255.0
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x.float()


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class FeatureStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray  # kept for KID and for re-use at other sample sizes

    @classmethod
    def from_features(cls, features: np.ndarray | Tensor) -> FeatureStats:
        f = np.asarray(torch.as_tensor(features).double().cpu().numpy(), dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), f)

    @property
    def n(self) -> int:
        return len(self.features)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # one temporary name per process: two jobs filling the same cache (two leaderboard halves started together
        # on a fresh clone) each write their own and the second rename wins, with the same statistics
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Statistics saved by `save`; anything else (a damaged file, another tool's .npz) is refused in one line."""
        try:
            with np.load(path, allow_pickle=False) as d:
                stats = cls(d["mu"], d["sigma"], d["features"])
        except Exception as e:  # noqa: BLE001 (zip, pickle, key and OS errors: numpy raises each of them)
            raise ConfigError(f"feature statistics {str(path)!r} do not load ({type(e).__name__}: "
                              f"{first_line(e)[:200]}); they must hold mu, sigma and features as saved here") from None
        if stats.mu.ndim != 1 or stats.sigma.shape != (len(stats.mu), len(stats.mu)):
            raise ConfigError(f"feature statistics {str(path)!r} have mu of shape {stats.mu.shape} and sigma of "
                              f"shape {stats.sigma.shape}; they must be (D,) and (D, D)")
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        standardise: bool = False) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets), unbiased MMD^2 with the cubic polynomial kernel.

    The kernel (x.y / d + 1)^3 assumes features of roughly unit scale, as Inception's are; ``standardise`` first maps
    both sets by ``b``'s (the reference's) per-dimension mean and std, so a feature space of another scale gets the
    kernel's intended regime (on the digits classifier's features the raw KID is noise at n = 500: docs/BENCHMARKS.md,
    "KID on the digits features")."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if standardise:
        mu, sd = b.mean(0), b.std(0) + 1e-8
        a, b = (a - mu) / sd, (b - mu) / sd
    m = min(len(a), len(b), subset_size)
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(mmd - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real`` features (N, D): each
    set's manifold is the union of balls reaching each sample's k-th nearest neighbour within its own set."""
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (fake, real))
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set, "
                         f"got {len(a)} and {len(b)}")

    def radii(x: Tensor) -> Tensor:  # distance to the k-th neighbour, the sample itself (distance 0) not counted
        return torch.cat([torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), chunk)])

    def inside(x: Tensor, y: Tensor, r: Tensor) -> float:  # fraction of x within some ball of (y, r)
        hit = [(torch.cdist(x[i : i + chunk], y) <= r).any(1) for i in range(0, len(x), chunk)]
        return float(torch.cat(hit).double().mean())

    return inside(a, b, radii(b)), inside(b, a, radii(a))


# ------------------------------------------------------------------------------------------------ features
class PixelPCA(nn.Module):
    """A second feature space that was trained on nothing: images resized to ``size`` x ``size`` (area average),
    flattened, centred on the reference's mean and projected onto the reference's top ``k`` principal axes.

    Frechet distance and precision / recall here measure the images' pixel statistics, independent of any
    classifier's notion of what matters (recent evaluation work asks for a second, differently trained backbone; on
    the offline digits task this is the one that needs no weights). Built from the reference images themselves, so
    the same reference always gives the same space."""

    def __init__(self, reference: np.ndarray | Tensor, k: int = 32, size: int = 16):
        super().__init__()
        self.size = size
        x = self._flat(as_float_images(reference))
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        self.register_buffer("mean", mean)
        self.register_buffer("axes", vh[: min(k, len(vh))].contiguous())

    def _flat(self, x: Tensor) -> Tensor:
        x = x.double()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.size) if x.shape[-1] > self.size else \
                torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return (self._flat(x.cpu()) - self.mean) @ self.axes.T


def feature_backend(backend: str | nn.Module, device: torch.device | str = "cpu") -> FeatureFn:
    """A function from float images (B, 3, H, W) in [0, 1] to features (B, D)."""
    if isinstance(backend, nn.Module):
        module = backend.to(device).eval()
        fn = getattr(module, "features", module)
        return lambda x: fn(x.to(device))
    if backend == "clean":
        from cleanfid.features import build_feature_extractor
        from cleanfid.resize import build_resizer

        try:
            model = build_feature_extractor("clean", torch.device(device))
        except Exception as e:  # noqa: BLE001 (offline: urllib's URLError; a damaged download: torch's errors)
            raise ConfigError(f"the clean-fid Inception network could not be loaded ({type(e).__name__}: "
                              f"{first_line(e)[:150]}); run once where there is network (clean-fid caches its "
                              "weights) or use --ref digits") from None
        resize = build_resizer("clean")

        def clean(x: Tensor) -> Tensor:
            imgs = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            batch = np.stack([resize(img) for img in imgs]).transpose(0, 3, 1, 2)
            return model(torch.from_numpy(batch).float().to(device))

        return clean
    if backend == "torchmetrics":
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device).eval()
        except Exception as e:  # noqa: BLE001 (offline: its download fails in several ways)
            raise ConfigError(f"torchmetrics' Inception network could not be loaded ({type(e).__name__}: "
                              f"{first_line(e)[:150]}); run once where there is network or use --ref digits") from None
        return lambda x: net((x.clamp(0, 1) * 255).round().to(torch.uint8).to(device)).reshape(len(x), -1)
    raise ConfigError(f"unknown feature backend {backend!r}; choose one of: clean, torchmetrics, or an nn.Module")


@torch.no_grad()
def extract(images: np.ndarray | Tensor, features: FeatureFn, batch_size: int = 256, progress: bool = False) -> Tensor:
    x = as_float_images(images)
    out = [features(x[i : i + batch_size]).double().cpu()
           for i in tqdm(range(0, len(x), batch_size), desc="features", disable=not progress)]
    return torch.cat(out)


def cached_stats(images: np.ndarray | Tensor, features: FeatureFn, cache: str | Path | None) -> FeatureStats:
    """Feature statistics of a reference set, computed once and cached at ``cache`` (an .npz path)."""
    if cache is not None and Path(cache).is_file():
        try:
            return FeatureStats.load(cache)
        except ConfigError:  # a damaged cache is recomputed (and rewritten), never trusted
            pass
    stats = FeatureStats.from_features(extract(images, features))
    if cache is not None:
        stats.save(cache)
    return stats


def cache_key(*parts: object) -> str:
    """A short stable hash; an nn.Module contributes its weights, so two nets of one shape never share a cache."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, nn.Module):
            for name, tensor in sorted(part.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(str(part).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def fid(images: np.ndarray | Tensor, reference: FeatureStats, features: FeatureFn) -> float:
    """FID of a set of images against reference statistics in the same feature space."""
    return fid_from_stats(FeatureStats.from_features(extract(images, features)), reference)
