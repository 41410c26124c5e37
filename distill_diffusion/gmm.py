"""The known-answer teacher: the exact denoiser of a class-conditional Gaussian mixture.

Data: class k has x0 ~ N(mu_k, s^2 I) in any dimension d, class k drawn with probability w_k (equal by default).
Under x_t = a x0 + sigma eps, x_t | k ~ N(a mu_k, v I) with v = a^2 s^2 + sigma^2, so the posterior mean (Tweedie) is

    E[x0 | x_t, k] = mu_k + (a s^2 / v) (x_t - a mu_k)

and without a class, E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k] with p(k | x_t) a softmax of
log w_k - |x_t - a mu_k|^2 / (2 v). This is the exact score of the data under the same `NoiseProcess` a real teacher
uses, so a distilled student can be compared with true samples: the one place where the right answer is known.

Students and critics are this teacher plus a small MLP correction whose last layer starts at zero, so both start equal
to the teacher (and the 1-step student starts as the teacher's 1-step DDIM).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import draws
from .denoiser import Cond, cfg_embedding
from .process import NoiseProcess


class GaussianMixture:
    """Isotropic mixture, classes weighted by ``weights`` (normalised; None: equal); ``ring`` places the means on a
    circle (first two coordinates)."""

    def __init__(self, means: Tensor, std: float, weights: list[float] | Tensor | None = None):
        if means.ndim != 2:
            raise ValueError("means must be (classes, dim)")
        if std <= 0:
            raise ValueError(f"mixture std must be > 0, got {std}")
        self.means = means.float()
        self.std = float(std)
        self.weighted = weights is not None
        w = torch.ones(len(means), dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
        if w.shape != (len(means),) or not bool((w > 0).all()):
            raise ValueError(f"mixture weights must be {len(means)} positive numbers, got {w.tolist()}")
        self.weights = (w / w.sum()).float()
        self.conditional = True  # whether students are trained and evaluated on the class (False: the null class)

    @classmethod
    def ring(cls, classes: int = 8, radius: float = 4.0, std: float = 0.3, dim: int = 2,
             weights: list[float] | None = None) -> GaussianMixture:
        if classes < 1 or dim < 2:
            raise ValueError(f"a ring mixture needs classes >= 1 and dim >= 2, got classes={classes}, dim={dim}")
        angle = torch.arange(classes, dtype=torch.float64) * 2 * math.pi / classes
        means = torch.zeros(classes, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * angle.cos(), radius * angle.sin()
        return cls(means.float(), std, weights)

    def draw_labels(self, n: int, generator: torch.Generator) -> Tensor:
        """n classes drawn with the mixture's weights (uniformly, as before weights existed, when they are equal)."""
        if not self.weighted:
            return draws.randint(0, self.classes, n, generator)
        u = draws.rand(n, generator)
        edges = self.weights.to(u.device).cumsum(0)
        return torch.searchsorted(edges, u.clamp(max=float(edges[-1]) - 1e-7), right=True)

    def nearest(self, samples: Tensor) -> Tensor:
        """The class whose mean is nearest to each sample."""
        return torch.cdist(samples.float(), self.means.to(samples.device)).argmin(1)

    @property
    def classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        eps = draws.randn((len(labels), self.dim), generator)
        return self.means.to(eps.device)[labels] + self.std * eps

    def balanced_labels(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.arange(n, device=device) % self.classes


class MixtureDenoiserNet(nn.Module):
    """Exact E[x0 | x_t, class] (class -1: unconditional), predicting x0 ("sample" prediction)."""

    def __init__(self, mixture: GaussianMixture, process: NoiseProcess):
        super().__init__()
        self.register_buffer("means", mixture.means.clone())
        log_w = mixture.weights.double().log() if mixture.weighted else torch.zeros(mixture.classes).double()
        self.register_buffer("log_weights", log_w, persistent=False)  # equal weights: exactly the unweighted form
        self.std = mixture.std
        self.process = process

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        x_t = x_t.double()
        a, sigma = self.process.alpha_sigma(t, x_t)  # (B, 1)
        mu = self.means.double()  # (K, d)
        v = a**2 * self.std**2 + sigma**2  # (B, 1)
        gain = a * self.std**2 / v  # (B, 1)
        # per-class posterior means: (B, K, d)
        per_class = mu[None] + gain[:, :, None] * (x_t[:, None, :] - a[:, :, None] * mu[None])
        logits = self.log_weights[None] - ((x_t[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1) / (2 * v)
        weights = logits.softmax(-1)
        labels = cond.labels if cond.labels is not None else torch.full((len(x_t),), -1, device=x_t.device)
        known = labels >= 0
        onehot = torch.zeros_like(weights)
        onehot[known] = nn.functional.one_hot(labels[known].long(), weights.shape[1]).double()
        weights = torch.where(known[:, None], onehot, weights)
        return (weights[:, :, None] * per_class).sum(1).float()


class ResidualMLP(nn.Module):
    """``base(x_t, t, cond) + MLP(c_in x_t, time features, class)``, the MLP's last layer zero at init."""

    def __init__(self, base: nn.Module, process: NoiseProcess, dim: int, classes: int, hidden: int = 128,
                 layers: int = 3, data_var: float = 1.0, cfg_dim: int | None = None, eps_features: bool = False,
                 smooth: bool = False):
        super().__init__()
        # ``smooth``, for methods that differentiate the network in t (continuous-time consistency): the correction
        # times sigma(t), as a v- or flow-predicting network's x0 error scales (at low noise x0 stays the exact
        # teacher's, so TrigFlow's F = (cos(t) x - x0) / (sigma_d sin t) stays bounded), and time features of the
        # noise angle with bounded derivatives instead of log-SNR octaves (whose t-derivative near pure noise is in
        # the hundreds: the sCM paper's Sec. 4.1 finds the same with high-frequency time embeddings)
        self.sigma_scaled = self.smooth_time = smooth
        self.base = base
        self.process = process
        self.data_var = float(data_var)
        self.classes = classes
        self.label_embed = nn.Embedding(classes + 1, hidden)  # index `classes` is the null class
        self.eps_features = eps_features  # also read the base's epsilon prediction (a discriminator's features)
        self.inp = nn.Linear(dim * (2 if eps_features else 1) + 16, hidden)
        blocks: list[nn.Module] = []
        for _ in range(layers - 1):
            blocks += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*blocks, nn.SiLU())
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # a w-conditioned student reads cond.cfg_scale through the same embedding a w-conditioned UNet gets
        self.cfg_dim = cfg_dim
        self.cfg_embed = nn.Linear(cfg_dim, hidden) if cfg_dim else None
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.end_time: nn.Linear | None = None  # a flow-map student's second time (`add_end_time`)

    @property
    def time_embedding(self) -> nn.Linear:
        """Where the time features enter (the input layer, (B, hidden)): a step-aware critic adds its step here."""
        return self.inp

    def add_end_time(self) -> None:
        """Read ``cond.end_timestep`` too (a flow-map student): its noise-angle harmonics through a layer that starts
        at zero (the correction's output layer is zero at start as well)."""
        if self.end_time is None:
            self.end_time = nn.Linear(16, self.inp.out_features)
            nn.init.zeros_(self.end_time.weight)
            nn.init.zeros_(self.end_time.bias)

    def time_features(self, t: Tensor, like: Tensor) -> Tensor:
        a, sigma = self.process.alpha_sigma(t, like)
        if self.smooth_time:  # the noise angle atan2(sigma, alpha) in [0, pi/2], harmonics 1 .. 8
            angle = torch.atan2(sigma, a).reshape(-1, 1)
            feats = torch.arange(1, 9, device=like.device, dtype=like.dtype) * angle
        else:  # log-SNR octaves; flow: alpha = 0 at t = T (pure noise)
            log_snr = (2 * (a / sigma).log()).clamp(-20, 20).reshape(-1, 1)
            feats = log_snr * 2 ** torch.arange(8, device=like.device, dtype=like.dtype) * math.pi / 16
        return torch.cat([torch.sin(feats), torch.cos(feats)], -1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        a, sigma = self.process.alpha_sigma(t, x_t)
        c_in = 1 / (a**2 * self.data_var + sigma**2).sqrt()
        feats = self.time_features(t, x_t)
        labels = cond.labels if cond.labels is not None else torch.full((len(x_t),), -1, device=x_t.device)
        labels = torch.where(labels < 0, torch.full_like(labels, self.classes), labels).long()
        base = self.base(x_t, t, cond)
        inputs = [c_in * x_t, feats]
        if self.eps_features:
            inputs.append((x_t - a * base.to(x_t.dtype)) / sigma)
        h = self.inp(torch.cat(inputs, -1)) + self.label_embed(labels)
        if self.end_time is not None:
            end = cond.end_timestep if cond.end_timestep is not None else t
            h = h + self.end_time(self.time_features(end, x_t))
        if self.cfg_embed is not None:
            w = cond.cfg_scale if cond.cfg_scale is not None else torch.ones(len(x_t), device=x_t.device)
            h = h + self.cfg_embed(cfg_embedding(w, self.cfg_dim).to(h.dtype))
        h = self.body(h)
        return base + (sigma if self.sigma_scaled else 1) * self.out(h)
