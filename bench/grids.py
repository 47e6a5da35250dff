"""Score DPM-Solver++ on another grid of noise levels than the default, with the scorecard of diffusion.evaluate.
Not a test: each run draws and scores 1000 digits.

    python bench/grids.py GRID [diffusion.evaluate's options]
    python bench/grids.py even --data-root DIR --seed 0              # the grid before: evenly in log-SNR, sigma_max to t = 0
    python bench/grids.py even:0.1 --data-root DIR --seed 0          # ... down to sigma 0.1
    python bench/grids.py jump:8,0.1 --data-root DIR --seed 0        # the default: one step to sigma 8, then evenly to 0.1
    python bench/grids.py rho:7,0.02 --data-root DIR --seed 0        # EDM's grid (Karras et al. 2022, Eq. 5)

sigma is the noise level sqrt((1 - alpha_bar) / alpha_bar); every grid starts at T - 1, where x_T is drawn.
"""
from __future__ import annotations

import math
import sys

import torch

import diffusion.generation
from diffusion.cli import run_cli
from diffusion.evaluate import main as evaluate
from diffusion.samplers import logsnr_timesteps, noise_levels, timesteps_at


def grid(spec: str):
    """sampler_timesteps with DPM-Solver++'s grid replaced by `spec`."""
    kind, _, arg = spec.partition(":")
    numbers = [float(v) for v in arg.split(",")] if arg else []

    def timesteps(sampler, s, steps):
        if sampler != "dpmpp":
            raise SystemExit("bench/grids.py compares DPM-Solver++ grids; leave --sampler out")
        sigma = noise_levels(s)
        high, low = sigma[-1].item(), (numbers or [sigma[0].item()])[-1]
        if kind == "jump":
            ts = logsnr_timesteps(s, steps, first_sigma=numbers[0], last_sigma=numbers[1])
        elif kind == "even":
            ts = timesteps_at(s, torch.logspace(math.log10(high), math.log10(low), steps, dtype=torch.float64)[1:])
        elif kind == "rho":
            rho, i = numbers[0], torch.linspace(0, 1, steps, dtype=torch.float64)
            ts = timesteps_at(s, ((high ** (1 / rho) + i * (low ** (1 / rho) - high ** (1 / rho))) ** rho)[1:])
        else:
            raise SystemExit(f"unknown grid {spec!r}: even[:LAST], jump:FIRST,LAST or rho:RHO,LAST")
        print(f"grid {spec}: sigma " + " ".join(f"{sigma[t]:.3g}" for t in ts), file=sys.stderr)
        return ts
    return timesteps


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    diffusion.generation.sampler_timesteps = grid(sys.argv[1])
    run_cli(evaluate, sys.argv[2:])
