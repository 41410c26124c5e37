"""How much of a teacher network's derivative in its timestep comes from the highest-frequency time features, and
what switching them off costs (`distill_diffusion.time_lowpass`, ``model.student_time_max_freq``).

For each embedded teacher and each cutoff: the norm of the exact derivative of the network's output in its timestep
(forward-mode AD), the secant over +-10 timesteps, and the relative change of the output, at timesteps 100, 400 and
800 on seeded noise and text features.

    python bench/time_input.py [--cutoffs 0.3 0.1] [--teachers digits digits-flow]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill_diffusion import zoo
from distill_diffusion.time_lowpass import lowpass_time_input


def network_call(teacher: str):  # noqa: ANN201
    pipe = zoo.load(teacher)
    g = torch.Generator().manual_seed(0)
    if teacher == "digits":
        net = pipe.unet.float().eval()
        x, c = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 32, generator=g) * 0.5
        return net, lambda n, tau: n(x, tau, encoder_hidden_states=c).sample
    net = pipe.transformer.float().eval()
    cfg = net.config
    x = torch.randn(8, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    e = torch.randn(8, 20, cfg.joint_attention_dim, generator=g) * 0.3
    p = torch.randn(8, cfg.pooled_projection_dim, generator=g) * 0.3
    return net, lambda n, tau: n(hidden_states=x, timestep=tau, encoder_hidden_states=e, pooled_projections=p).sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cutoffs", type=float, nargs="+", default=[0.3, 0.1])
    ap.add_argument("--teachers", nargs="+", default=["digits", "digits-flow"])
    args = ap.parse_args()
    print("| teacher | max freq (rad / timestep) | channels off | timestep | d/dtau (AD) | secant +-10 | "
          "output change |")
    print("|---|---|---|---|---|---|---|")
    for teacher in args.teachers:
        net, call = network_call(teacher)
        for cutoff in [None, *args.cutoffs]:
            low = net if cutoff is None else copy.deepcopy(net)
            off = 0 if cutoff is None else lowpass_time_input(low, cutoff)
            for level in (100.0, 400.0, 800.0):
                tau = torch.full((8,), level)
                with sdpa_kernel(SDPBackend.MATH):
                    out, d = torch.func.jvp(lambda t, n=low, f=call: f(n, t), (tau,), (torch.ones_like(tau),))
                with torch.no_grad():
                    base = call(net, tau)
                    secant = (call(low, tau + 10) - call(low, tau - 10)) / 20
                change = float((out - base).norm() / base.norm())
                print(f"| {teacher} | {cutoff or 'all'} | {off} | {level:.0f} | {float(d.norm()):.4f} | "
                      f"{float(secant.norm()):.4f} | {change:.4f} |", flush=True)


if __name__ == "__main__":
    main()
