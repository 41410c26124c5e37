"""The total derivative of a network along a direction in (x, t), for the continuous-time methods (sCM, rCM,
MeanFlow): forward-mode automatic differentiation, or a central finite difference where forward mode is missing.

``torch.func.jvp`` runs under PyTorch's math attention kernel (the fused CPU / flash kernels have no forward-AD rule);
the finite difference evaluates the network three times with the same random draws (dropout, where a network has
it), as NVlabs/FastGen's fallback does (``fastgen/methods/consistency_model/sCM.py``, ``mean_flow.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MODES = ("autograd", "finite_difference")


def derivative_along(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, dx: Tensor, mode: str,
                     fd_step: float = 1e-4) -> tuple[Tensor, Tensor]:
    """(fn(x, t), d/de fn(x + e dx, t + e) at e = 0). ``t`` is (B,), ``dx`` shaped like ``x``. ``fd_step``: the finite
    difference's step relative to t (h = fd_step t), which keeps it central everywhere on a schedule that is smooth
    past its ends (`NoiseProcess.alpha_bar`)."""
    if mode == "autograd":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, (x, t), (dx, torch.ones_like(t)))
    if mode != "finite_difference":
        raise ValueError(f"unknown derivative mode {mode!r}; choose one of: {', '.join(MODES)}")
    h = fd_step * t.clamp_min(1e-3)
    hx = h.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    step = hx * dx
    with _same_rng(x):
        plus = fn(x + step, t + h)
    with _same_rng(x):
        minus = fn(x - step, t - h)
    with _same_rng(x):
        mid = fn(x, t)
    return mid, (plus - minus) / (2 * hx)


def _same_rng(like: Tensor):  # noqa: ANN202
    return torch.random.fork_rng(devices=[like.device] if like.device.type == "cuda" else [])
