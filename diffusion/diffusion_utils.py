"""DDPM math (Ho et al. 2020): the noise schedule, q(x_t | x_0), the posterior, and the loss.

Notation (paper symbol -> name here):
    beta_t                          beta
    alpha_t = 1 - beta_t            alpha
    alpha_bar_t = prod_{s<=t} alpha alpha_bar
    alpha_bar_{t-1}                 alpha_bar_prev (1 before the first step)
    beta~_t (Eq. 7)                 posterior_var
    x_0, x_t, epsilon               x0, xt, eps

Convention that trips people up: t is 0-indexed. Index t = 0 is the paper's t = 1 and
t = T - 1 is the paper's t = T. The network is trained and sampled on exactly these indices.
Schedules are computed in float64 and stored in float32 (or any dtype asked for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps = model(xt, t)


@dataclass(frozen=True)
class Schedule:
    """The per-timestep constants of a diffusion process; plain 1-D tensors of length T."""

    beta: torch.Tensor
    alpha: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    posterior_var: torch.Tensor

    @property
    def T(self) -> int:
        return self.beta.shape[0]

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T for other T
    (Nichol & Dhariwal 2021's convention), so that x_T is close to N(0, I) for every T: unscaled, T = 100
    would leave alpha_bar_T = 0.36 and every sampler would start from the wrong distribution."""
    scale = 1000 / T
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at 0.999."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def make_schedule(kind: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                  dtype: torch.dtype = torch.float32) -> Schedule:
    """Build a Schedule in float64, store it in `dtype`."""
    beta = linear_betas(T, beta_start, beta_end) if kind == "linear" else cosine_betas(T)
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, dim=0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    posterior_var = beta * (1 - alpha_bar_prev) / (1 - alpha_bar)  # Eq. 7
    return Schedule(*(v.to(dtype) for v in (beta, alpha, alpha_bar, alpha_bar_prev, posterior_var)))


def schedule_from_config(cfg, dtype: torch.dtype = torch.float32) -> Schedule:
    return make_schedule(cfg.schedule, cfg.timesteps, cfg.beta_start, cfg.beta_end, dtype)


def final_alpha_bar(kind: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> float:
    """alpha_bar_T in float64: how much signal is left where sampling starts from pure noise."""
    beta = linear_betas(T, beta_start, beta_end) if kind == "linear" else cosine_betas(T)
    return torch.prod(1 - beta).item() if beta.max() < 1 else 0.0


def values_at(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against a batch x of shape (B, ...)."""
    return values[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I), Eq. 4."""
    return values_at(s.alpha_bar, t, x0).sqrt() * x0 + (1 - values_at(s.alpha_bar, t, x0)).sqrt() * eps


def predict_x0(xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """Invert Eq. 4 for x_0 given the noise: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    return (xt - (1 - values_at(s.alpha_bar, t, xt)).sqrt() * eps) / values_at(s.alpha_bar, t, xt).sqrt()


def predict_eps(xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, s: Schedule) -> torch.Tensor:
    """Invert Eq. 4 for the noise given x_0."""
    return (xt - values_at(s.alpha_bar, t, xt).sqrt() * x0) / (1 - values_at(s.alpha_bar, t, xt)).sqrt()


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, s: Schedule):
    """Mean and variance of q(x_{t-1} | x_t, x_0), Eqs. 6-7."""
    alpha_bar_prev = values_at(s.alpha_bar_prev, t, xt)
    coef_x0 = alpha_bar_prev.sqrt() * values_at(s.beta, t, xt) / (1 - values_at(s.alpha_bar, t, xt))
    coef_xt = values_at(s.alpha, t, xt).sqrt() * (1 - alpha_bar_prev) / (1 - values_at(s.alpha_bar, t, xt))
    return coef_x0 * x0 + coef_xt * xt, values_at(s.posterior_var, t, xt)


def preconditioning(alpha_bar: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_in, c_xt, c_net), each (T,), for a network F that predicts a mix of x_0 and eps: it sees c_in x_t and
    eps = c_xt x_t + c_net F. This is Karras et al. 2022's preconditioning (Table 1, x_0 = c_skip x + c_out F on
    x = x_t / sqrt(alpha_bar), sigma^2 = (1 - alpha_bar) / alpha_bar) written for x_t and read back as eps:
    with D = 1 - alpha_bar + alpha_bar sigma_data^2, the variance of x_t,
        c_in = 1 / sqrt(D),  c_xt = sqrt(1 - alpha_bar) / D,  c_net = -sqrt(alpha_bar) sigma_data / sqrt(D).
    sigma_data = 1 is v-prediction (Salimans & Ho 2022): F = -v, c_in = 1. F's target has unit variance at every
    t, so L_simple on F is the eps loss weighted by 1 / c_net^2; see target_weights."""
    alpha_bar = alpha_bar.double()
    d = 1 - alpha_bar + alpha_bar * sigma_data**2
    return d.rsqrt(), (1 - alpha_bar).sqrt() / d, -alpha_bar.sqrt() * sigma_data / d.sqrt()


def target_weights(c_net: torch.Tensor) -> torch.Tensor:
    """Weights (T,) on the eps loss that make it the unweighted loss on the network's own output F:
    eps_pred - eps = c_net (F_pred - F_target)."""
    return c_net.double().square().reciprocal()


def min_snr_weights(s: Schedule, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for eps prediction (Hang et al. 2023): min(SNR_t, gamma) / SNR_t with
    SNR_t = alpha_bar_t / (1 - alpha_bar_t). Low-noise steps, whose eps is easy and whose gradients fight
    the others', weigh less; gamma = inf gives 1 everywhere (L_simple)."""
    snr = s.alpha_bar / (1 - s.alpha_bar)
    return snr.clamp(max=gamma) / snr


def lognormal_t_probs(s: Schedule, mean: float, std: float) -> torch.Tensor:
    """P(t) (T,) for drawing training timesteps so that the noise level sigma_t = sqrt((1 - alpha_bar_t) /
    alpha_bar_t) is log-normal, ln sigma ~ N(mean, std^2) (Karras et al. 2022, Sec. 5): each t gets the density
    of its ln sigma_t times the width in ln sigma it stands for. Uniform t spends half the steps at sigma > 2,
    where x_t is nearly pure noise and eps nearly x_t: easy steps that teach little."""
    log_sigma = (0.5 * (torch.log1p(-s.alpha_bar.double()) - torch.log(s.alpha_bar.double())))
    width = torch.gradient(log_sigma)[0]
    density = torch.exp(-0.5 * ((log_sigma - mean) / std) ** 2)
    probs = density * width
    return (probs / probs.sum()).float()


def mix_with_uniform(probs: torch.Tensor, share: float) -> torch.Tensor:
    """P(t) (T,) for drawing a `share` of the steps' t from `probs` and the rest uniformly (Algorithm 1)."""
    return (1 - share) / probs.numel() + share * probs


def draw_t(n: int, T: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           t_probs: torch.Tensor | None = None, stratified: bool = False) -> torch.Tensor:
    """n steps in 0..T-1, uniform or from t_probs (T,). Independent draws are Algorithm 1's. Stratified draws share
    one uniform u and take the quantiles (u + i) / n, i < n, so every batch covers the distribution evenly (the
    low-discrepancy sampler of Kingma et al. 2021). The images of a batch come in random order, so each image's t
    still has the asked distribution and the loss its expectation; only the batch's spread of t is tied."""
    if not stratified:
        if t_probs is None:
            return torch.randint(0, T, (n,), device=device, generator=generator)
        return torch.multinomial(t_probs, n, replacement=True, generator=generator)
    u = (torch.rand((), device=device, generator=generator) + torch.arange(n, device=device)) / n
    if t_probs is None:
        return (u * T).long().clamp_(max=T - 1)
    return torch.searchsorted(torch.cumsum(t_probs, 0), u, right=True).clamp_(max=T - 1)


def diffusion_loss(model: EpsModel, x0: torch.Tensor, s: Schedule, generator: torch.Generator | None = None,
                   weights: torch.Tensor | None = None, t_probs: torch.Tensor | None = None, stratified: bool = False):
    """L_simple, Algorithm 1: || eps - eps_theta(sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, t) ||^2, t uniform
    or drawn from t_probs (T,), independently or stratified (draw_t); `weights` (T,) scales each image's squared
    error by weights[t] (None = L_simple)."""
    t = draw_t(x0.shape[0], s.T, generator, x0.device, t_probs, stratified)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
    eps_pred = model(q_sample(x0, t, eps, s), t).float()
    if weights is None:
        return F.mse_loss(eps_pred, eps)
    return ((eps_pred - eps).square().flatten(1).mean(1) * weights[t]).mean()
