"""Editing with a trained network, as pure functions beside the samplers: inpainting (RePaint, Lugmayr et al.
2022) and spherical interpolation of the starting noise."""
from __future__ import annotations

import math

import torch

from diffusion.diffusion_utils import EpsModel, Schedule
from diffusion.samplers import Callback, denoise, ddim_step


@torch.inference_mode()
def inpaint(model: EpsModel, x: torch.Tensor, s: Schedule, timesteps: list[int], known: torch.Tensor,
            keep: torch.Tensor, *, generator: torch.Generator | None = None, callback: Callback = None,
            clip_x0: bool = True, eta: float = 1.0, resample: int = 1) -> torch.Tensor:
    """Fill in the pixels where `keep` is False, starting from noise x, so that they agree with `known` (in [-1, 1])
    where `keep` is True.

    RePaint with DDIM steps: after every step from t to u the kept pixels are replaced by `known` noised to
    level u (q(x_u | x_0)), so the network sees a consistent image; each step is then undone by forward noise
    (q(x_t | x_u)) and redone `resample` times in all, which lets the generated part adjust to the kept one.
    The last step lands on `known` exactly, so kept pixels come back unchanged. With nothing kept and
    resample = 1 it draws the same random numbers as sample_ddim and returns the same images.
    """
    keep = keep.to(torch.bool).expand_as(x)
    anything_kept = bool(keep.any())

    def noised_known(alpha_bar: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return alpha_bar.sqrt() * known + (1 - alpha_bar).sqrt() * z

    ts = timesteps
    if anything_kept:
        x = torch.where(keep, noised_known(s.alpha_bar[ts[0]]), x)
    for i, t in enumerate(ts):
        last = i + 1 == len(ts)
        alpha_bar, alpha_bar_prev = s.alpha_bar[t], s.alpha_bar[ts[i + 1]] if not last else torch.ones_like(s.alpha_bar[t])
        for r in range(1 if last else resample):
            _, eps, x0 = denoise(model, x, t, s, clip_x0)
            x_next, sigma = ddim_step(x0, eps, alpha_bar, alpha_bar_prev, eta)
            if eta > 0 and not last:
                x_next = x_next + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            if anything_kept:
                x_next = torch.where(keep, known if last else noised_known(alpha_bar_prev), x_next)
            if r + 1 < resample and not last:  # back from u to t by the forward process, then step again
                step = alpha_bar / alpha_bar_prev
                z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = step.sqrt() * x_next + (1 - step).sqrt() * z
            else:
                x = x_next
        if callback:
            callback(i, x, x0)
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a to b (same shape, one image each) at each fraction in [0, 1]; returns
    (len(fractions), *a.shape). Gaussian noise lives near a sphere, where a straight line would pass inside it
    and give the network starting points of the wrong norm."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    f = fractions.double().view(-1, 1)
    if theta.item() < 1e-6:  # parallel: the arc is a line
        out = (1 - f) * a_flat + f * b_flat
    else:
        out = (torch.sin((1 - f) * theta) * a_flat + torch.sin(f * theta) * b_flat) / math.sin(theta.item())
    return out.to(a.dtype).view(len(fractions), *a.shape)
