"""The paper's likelihood: the variational bound of Ho et al. 2020 (Eq. 5) in bits per dimension.

    -log p(x_0) <= L_T + sum_{t=2..T} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                       the prior term, no network
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     one network call each
    L_0     = -log p(x_0 | x_1)                                 the discrete decoder (Sec. 3.3)

p(x_{t-1} | x_t) is the ancestral sampler's step (samplers.sample_ddpm): mean q_posterior(x0_hat, x_t), variance
beta~_t (Eq. 7). beta~ is 0 at the first step, so the decoder uses the next step's beta~ instead, as Nichol &
Dhariwal's code does. With equal variances each KL is ||mu~ - mu||^2 / (2 beta~_t).

The T - 1 KL terms are summed by stratified sampling: the steps 2..T are cut into K strata of nearly equal size
and each image draws one step in each, so the estimate is unbiased and costs K + 1 network calls per image
instead of T. In code, index t = 0 is the paper's t = 1 (diffusion_utils.py).
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from diffusion.diffusion_utils import Schedule, predict_x0, q_posterior, q_sample

LEVELS = 256  # 8-bit pixels scaled to [-1, 1]: bins of width 2 / 255 centred on the pixel values


def normal_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def log_normal_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails: above 0 it is computed as
    Phi(-lower) - Phi(-upper), so that two values near 1 are never subtracted."""
    flip = lower > 0
    a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log1p(-torch.exp(log_b - log_a))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log p(x) per element for x on the LEVELS pixel values in [-1, 1], under N(mean, std^2) integrated over
    each value's bin; the outermost bins reach to -inf and +inf, so the probabilities of all values sum to 1."""
    half = 1 / (LEVELS - 1)
    upper = torch.where(x > 1 - half, torch.full_like(x, math.inf), (x + half - mean) / std)
    lower = torch.where(x < -1 + half, torch.full_like(x, -math.inf), (x - half - mean) / std)
    return log_normal_cdf_difference(upper, lower)


def prior_nats(x0: torch.Tensor, s: Schedule) -> torch.Tensor:
    """L_T per image: how far q(x_T | x_0) is from the N(0, I) that sampling starts from."""
    a = s.alpha_bar[-1].to(x0.dtype)
    kl = normal_kl(a.sqrt() * x0, (1 - a).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))
    return kl.flatten(1).sum(1)


def model_step(xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, s: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of p(x_{t-1} | x_t): q_posterior around the predicted x0, variance beta~_t, with beta~ of
    index 1 at index 0 (where beta~ is 0)."""
    mean, _ = q_posterior(predict_x0(xt, t, eps, s), xt, t, s)
    var = torch.where(t == 0, s.posterior_var[1], s.posterior_var[t]).to(xt.dtype)
    return mean, var.view(-1, *([1] * (xt.dim() - 1))).expand_as(xt)


def kl_nats(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """L_{t-1} per image at indices t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
    true_mean, true_var = q_posterior(x0, xt, t, s)
    return normal_kl(true_mean, true_var.expand_as(x0), *model_step(xt, t, eps, s)).flatten(1).sum(1)


def decoder_nats(x0: torch.Tensor, x1: torch.Tensor, eps: torch.Tensor, s: Schedule) -> torch.Tensor:
    """L_0 per image: -log p(x_0 | x_1), the Gaussian of the last step integrated over each pixel value's bin."""
    mean, var = model_step(x1, torch.zeros(len(x0), dtype=torch.long), eps, s)
    return -discretized_gaussian_log_likelihood(x0, mean, var.sqrt()).flatten(1).sum(1)


def strata(T: int, k: int) -> list[tuple[int, int]]:
    """k index ranges [lo, hi) of nearly equal size covering 1..T-1 (the KL terms; index 0 is the decoder)."""
    edges = torch.linspace(1, T, k + 1).round().long().tolist()
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@torch.no_grad()
def bits_per_dim(model, x0: torch.Tensor, s: Schedule, k: int, *, labels: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", batch: int = 256, generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
    """The bound's estimate per image, in bits per dimension, for x0 (N, C, H, W) on the pixel values in [-1, 1].
    model(xt, t) predicts eps on `device`, `batch` images at a time (model(xt, t, labels) with labels (N,): the
    bound of p(x | label)); the bound is summed on the CPU in float64 (Apple's MPS has no float64)."""
    x0 = x0.double().cpu()
    s = Schedule(*(getattr(s, f).double().cpu() for f in s.__dataclass_fields__))
    ranges = strata(s.T, k)
    bar = tqdm(total=len(ranges) + 1, unit="step", desc="bits/dim", disable=not progress)

    def draw(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t of each digit at its step t, and the network's eps for it."""
        xt = q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=torch.float64), s)
        eps = []
        for i in range(0, len(x0), batch):
            given = () if labels is None else (labels[i:i + batch].to(device),)
            eps.append(model(xt[i:i + batch].float().to(device), t[i:i + batch].to(device), *given).double().cpu())
        bar.update()
        return xt, torch.cat(eps)

    total = prior_nats(x0, s) + decoder_nats(x0, *draw(torch.zeros(len(x0), dtype=torch.long)), s)
    for lo, hi in ranges:
        t = torch.randint(lo, hi, (len(x0),), generator=generator)
        xt, eps = draw(t)
        total += (hi - lo) * kl_nats(x0, xt, t, eps, s)
    bar.close()
    return total / (x0[0].numel() * math.log(2))
