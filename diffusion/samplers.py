"""Samplers as pure functions sharing one signature: sample_*(model, x_T, schedule, steps, ...).

`model` is anything with eps = model(xt, t): the U-Net, its EMA copy, or a guidance closure
(see `guided`). `callback(i, xt, x0_pred)` is called after each step (progress bars, animations).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from diffusion.diffusion_utils import EpsModel, Schedule, predict_eps, predict_x0, q_posterior

Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def spaced_timesteps(T: int, steps: int) -> list[int]:
    """`steps` indices from T-1 (the last trained step) down to 0, evenly spaced."""
    _check_steps(T, steps)
    return torch.linspace(T - 1, 0, steps).round().long().tolist()


# DPM-Solver++'s grid, chosen with the scorecard at 10 steps (docs/results.md "The grid of noise levels"): above
# sigma 8 the prediction of x0 is little more than the label's mean digit, so one step crosses it and the rest go
# where the digit takes shape; the last network call is at sigma 0.1, whose prediction of x0 is the image
FIRST_SIGMA = 8.0
LAST_SIGMA = 0.1


def noise_levels(s: Schedule) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every t, in float64 on the CPU (MPS has no float64)."""
    alpha_bar = s.alpha_bar.detach().cpu().double()
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def timesteps_at(s: Schedule, sigmas: torch.Tensor) -> list[int]:
    """T-1 (pure noise), then for each noise level in `sigmas` (decreasing) the index nearest to it in log(sigma):
    len(sigmas) + 1 distinct, descending indices. Where the schedule has fewer indices than targets, neighbours
    would share one: each keeps room for the rest, then descent is forced."""
    steps = len(sigmas) + 1
    _check_steps(s.T, steps)
    log_sigma = noise_levels(s).log()
    nearest = (log_sigma[None, :] - sigmas.double().log()[:, None]).abs().argmin(dim=1)
    i = torch.arange(steps)
    ts = torch.cat([torch.tensor([s.T - 1]), nearest])
    ts = torch.minimum(torch.maximum(ts, steps - 1 - i), s.T - 1 - i).tolist()
    for k in range(1, steps):
        ts[k] = min(ts[k], ts[k - 1] - 1)
    return ts


def logsnr_timesteps(s: Schedule, steps: int, first_sigma: float = FIRST_SIGMA,
                     last_sigma: float = LAST_SIGMA) -> list[int]:
    """Exactly `steps` distinct indices: T-1 (pure noise), then steps - 1 from noise level first_sigma down to
    last_sigma, as evenly spaced in lambda = log(alpha/sigma) = -log(sigma) as integers allow, as DPM-Solver
    recommends: uniform-in-t spacing would put most of lambda's change in the last step, where the second-order
    correction overshoots. Two steps: pure noise, then last_sigma."""
    _check_steps(s.T, steps)
    lam = torch.linspace(-math.log(first_sigma), -math.log(last_sigma), steps - 1, dtype=torch.float64)
    return timesteps_at(s, (-lam).exp() if steps > 2 else torch.tensor([last_sigma] * (steps - 1)))


def ancestral_timesteps(T: int) -> list[int]:
    """Every index from T-1 down to 0: Algorithm 2 visits them all."""
    return list(range(T - 1, -1, -1))


def sampler_timesteps(sampler: str, s: Schedule, steps: int) -> list[int]:
    """The timestep list each sampler is meant to run on; computed before the loop starts."""
    if sampler == "ddpm":
        return ancestral_timesteps(s.T)
    return logsnr_timesteps(s, steps) if sampler == "dpmpp" else spaced_timesteps(s.T, steps)


def _check_steps(T: int, steps: int) -> None:
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")


def denoise(model: EpsModel, x: torch.Tensor, t: int, s: Schedule, clip_x0: bool):
    """The network at step t: (t as a batch tensor, eps, predicted x0), eps made consistent with a clipped x0."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = model(x, tt).to(x.dtype)
    x0 = predict_x0(x, tt, eps, s)
    if clip_x0:  # clip, then make eps consistent with the clipped x0 (Song et al. 2021 do the same)
        x0 = x0.clamp(-1, 1)
        eps = predict_eps(x, tt, x0, s)
    return tt, eps, x0


@torch.inference_mode()
def sample_ddpm(model: EpsModel, x: torch.Tensor, s: Schedule, timesteps: list[int] | None = None, *,
                generator: torch.Generator | None = None, callback: Callback = None,
                clip_x0: bool = True, variance: str = "posterior") -> torch.Tensor:
    """Ancestral sampling over all T steps, Algorithm 2, written as q(x_{t-1} | x_t, x0_pred)."""
    timesteps = ancestral_timesteps(s.T) if timesteps is None else timesteps
    if timesteps != ancestral_timesteps(s.T):
        raise ValueError("sample_ddpm steps through every t from T-1 to 0; use sample_ddim to skip steps")
    for i, t in enumerate(timesteps):
        tt, _, x0 = denoise(model, x, t, s, clip_x0)
        mean, var = q_posterior(x0, x, tt, s)  # without clipping this equals Eq. 11's mean
        if variance == "beta":  # sigma_t^2 = beta_t, the paper's other choice
            var = s.beta[t].to(x.dtype)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x = mean + (var.sqrt() * noise if t > 0 else 0)
        if callback:
            callback(i, x, x0)
    return x


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float):
    """Mean and std of one DDIM step from alpha_bar = alpha_bar to alpha_bar_prev, Song et al. 2021, Eqs. 12 and 16."""
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps, sigma


@torch.inference_mode()
def sample_ddim(model: EpsModel, x: torch.Tensor, s: Schedule, timesteps: list[int], *,
                generator: torch.Generator | None = None, callback: Callback = None,
                clip_x0: bool = True, eta: float = 0.0) -> torch.Tensor:
    """DDIM, Song et al. 2021, Eq. 12, over decreasing `timesteps` (e.g. spaced_timesteps(T, 50)):
    eta = 0 is deterministic, eta = 1 has DDPM's posterior variance; above 1 the noise would exceed sqrt(1 -
    alpha_bar_prev) and the step would leave q(x_{t-1} | x_0) (ddim_step clamps it; the recipe refuses it)."""
    ts = timesteps
    for i, t in enumerate(ts):
        _, eps, x0 = denoise(model, x, t, s, clip_x0)
        alpha_bar_prev = s.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.ones_like(s.alpha_bar[t])
        x, sigma = ddim_step(x0, eps, s.alpha_bar[t], alpha_bar_prev, eta)
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if callback:
            callback(i, x, x0)
    return x


@torch.inference_mode()
def sample_dpmpp(model: EpsModel, x: torch.Tensor, s: Schedule, timesteps: list[int], *,
                 generator: torch.Generator | None = None, callback: Callback = None,
                 clip_x0: bool = True, eta: float = 0.0) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2 (multistep, data prediction), over decreasing
    `timesteps` (logsnr_timesteps(s, steps) is the recommended spacing).

    eta = 0 is the ODE solver; eta = 1 is SDE-DPM-Solver++(2M) from the same paper: each step keeps only
    e^{-h} of the current noise and adds fresh noise, like the ancestral sampler, which hides the small
    errors of a briefly trained model that a deterministic path carries to the end.
    """
    ts = timesteps
    alpha, sigma = s.alpha_bar.sqrt(), (1 - s.alpha_bar).sqrt()
    lam = (alpha / sigma).log()  # lambda_t = log(alpha_t / sigma_t), half the log-SNR
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        _, _, x0 = denoise(model, x, t, s, clip_x0)
        if i + 1 == len(ts):  # final step to sigma = 0: the solution is the data prediction itself
            x = x0
        else:
            u = ts[i + 1]
            h = lam[u] - lam[t]
            # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1} with r = h_prev / h; plain x0 on the first step
            d = x0 if x0_prev is None else x0 + h / (2 * h_prev) * (x0 - x0_prev)
            x = (sigma[u] / sigma[t]) * torch.exp(-eta * h) * x - alpha[u] * torch.expm1(-(1 + eta) * h) * d
            if eta > 0:
                z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = x + sigma[u] * (-torch.expm1(-2 * eta * h)).sqrt() * z
            x0_prev, h_prev = x0, h
        if callback:
            callback(i, x, x0)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp": sample_dpmpp}


def guided(net: torch.nn.Module, labels: torch.Tensor | None, w: float, null_label: int,
           guide_t: tuple[int, int] | None = None, weak: torch.nn.Module | None = None) -> EpsModel:
    """Classifier-free guidance (Ho & Salimans 2022) as a closure: eps_u + w (eps_c - eps_u).

    w = 1 is the conditional model, w = 0 the unconditional one. labels=None samples unconditionally.
    Conditional and unconditional inputs go through the network as one batch. guide_t = (lo, hi) guides
    only at lo <= t <= hi and uses the conditional model elsewhere (Kynkaanniemi et al. 2024): guidance
    at the highest noise levels pulls every sample of a label towards one mode and costs variety.

    weak, a less trained network of the same run, replaces the unconditional model (autoguidance, Karras et
    al. 2024): eps_weak + w (eps - eps_weak), both given the same labels (or none). It pushes away from the
    errors that training was still removing rather than from other classes, so it sharpens without making
    digits alike, and it also guides sampling without labels.
    """
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        null = torch.full((x.shape[0],), null_label, device=x.device, dtype=torch.long)
        y = null if labels is None else labels
        if weak is None and (labels is None or w == 0):
            return net(x, t, null)
        if w == 1 or (guide_t is not None and not guide_t[0] <= int(t[0]) <= guide_t[1]):
            return net(x, t, y)
        if weak is not None:
            eps_c, eps_u = net(x, t, y).float(), weak(x, t, y).float()
        else:
            eps_c, eps_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
        return eps_u + w * (eps_c - eps_u)  # in float32 even under bf16 autocast: w amplifies rounding
    return model


def guidance_timesteps(s: Schedule, sigma_lo: float, sigma_hi: float) -> tuple[int, int]:
    """The t range whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (sigma_lo, sigma_hi]."""
    sigma = noise_levels(s)
    inside = ((sigma > sigma_lo) & (sigma <= sigma_hi)).nonzero().flatten()
    return (int(inside[0]), int(inside[-1])) if len(inside) else (1, 0)  # (1, 0): an empty range
