"""The variational bound in bits per dimension (diffusion/likelihood.py) against closed forms."""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion.diffusion_utils import make_schedule, predict_eps, q_sample
from diffusion.likelihood import (LEVELS, bits_per_dim, discretized_gaussian_log_likelihood,
                                  kl_nats, log_normal_cdf_difference, normal_kl, prior_nats, strata)

S = make_schedule("linear", 1000, dtype=torch.float64)
PIXELS = torch.arange(LEVELS, dtype=torch.float64) / 127.5 - 1  # the 256 values an 8-bit pixel can take


def test_normal_kl_is_torchs():
    m1, v1, m2, v2 = torch.tensor([0.3, -2.0]), torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.1]), torch.tensor([0.2, 3.0])
    expected = kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt()))
    assert torch.allclose(normal_kl(m1, v1, m2, v2), expected, atol=1e-6)


@pytest.mark.parametrize("mean, std", [(0.0, 0.5), (-1.0, 0.003), (0.97, 1e-3), (3.0, 0.2), (0.1, 5.0)])
def test_the_decoder_is_a_distribution_over_the_256_pixel_values(mean, std):
    log_p = discretized_gaussian_log_likelihood(PIXELS, torch.tensor(mean, dtype=torch.float64),
                                                torch.tensor(std, dtype=torch.float64))
    assert torch.isfinite(log_p).all() or std < 0.01  # far bins of a narrow Gaussian may underflow to -inf
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    inner = PIXELS[100]  # an inner value: Phi(x + 1/255) - Phi(x - 1/255)
    n = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    direct = n.cdf(inner + 1 / 255) - n.cdf(inner - 1 / 255)
    if direct > 1e-12:
        assert log_p[100].item() == pytest.approx(math.log(direct.item()), rel=1e-6)


def test_the_cdf_difference_is_accurate_far_in_the_tails():
    upper, lower = torch.tensor([40.0, -39.0], dtype=torch.float64), torch.tensor([39.0, -40.0], dtype=torch.float64)
    got = log_normal_cdf_difference(upper, lower)
    expected = torch.special.log_ndtr(torch.tensor(-39.0, dtype=torch.float64))  # Phi(-40) is e^-40 times smaller
    assert torch.allclose(got, expected.expand(2), rtol=1e-9)


def test_each_kl_term_is_eq_12s_weighted_noise_error():
    """With x_t from x_0 and eps, L_{t-1} = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) ||eps - eps_hat||^2."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 5, 100, 500, 900, 999])
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    eps_hat = eps + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = q_sample(x0, t, eps, S)
    weight = S.beta[t] ** 2 / (2 * S.posterior_var[t] * S.alpha[t] * (1 - S.alpha_bar[t]))
    expected = weight * (eps - eps_hat).square().flatten(1).sum(1)
    assert torch.allclose(kl_nats(x0, xt, t, eps_hat, S), expected, rtol=1e-8)


def test_a_perfect_model_of_one_image_pays_only_the_prior_and_the_decoder():
    """For data of one image, eps_hat = the noise that x_t holds makes every KL term 0: what is left is L_T and
    the decoder's bins around the exact mean with the variance beta~ of index 1."""
    g = torch.Generator().manual_seed(1)
    image = PIXELS[torch.randint(0, LEVELS, (1, 1, 28, 28), generator=g)]
    image[0, 0, :2] = -1
    image[0, 0, -2:] = 1  # the two outermost bins, which reach to infinity
    x0 = image.expand(3, -1, -1, -1)
    model = lambda xt, t: predict_eps(xt.double(), t, image.expand(len(t), -1, -1, -1), S).float()
    got = bits_per_dim(model, x0, S, k=20, generator=g)

    a = S.alpha_bar[-1]
    prior = 0.5 * (-torch.log(1 - a) + (1 - a) + a * image.square() - 1).sum()
    z = 1 / 255 / S.posterior_var[1].sqrt()
    edge = image.abs() == 1
    log_bin = torch.where(edge, torch.special.log_ndtr(z), torch.log(torch.special.ndtr(z) - torch.special.ndtr(-z)))
    expected = (prior - log_bin.sum()) / (784 * math.log(2))
    assert torch.allclose(got, expected.expand(3).to(got.dtype), rtol=1e-4), (got, expected)


def test_the_strata_cover_every_kl_step_once():
    for T, k in ((1000, 50), (1000, 999), (20, 7), (10, 30)):
        covered = [t for lo, hi in strata(T, k) for t in range(lo, hi)]
        assert covered == list(range(1, T))


def test_stratified_sampling_is_unbiased():
    """Few strata and many average to the same bound: each stratum's draw is weighted by its size."""
    s = make_schedule("linear", 40, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x0 = PIXELS[torch.randint(0, LEVELS, (400, 1, 4, 4), generator=g)]
    point = x0[:1]
    model = lambda xt, t: 0.8 * predict_eps(xt.double(), t, point.expand(len(t), -1, -1, -1), s).float()
    every = bits_per_dim(model, x0, s, k=39, generator=g)  # one stratum per step: exact in t
    few = bits_per_dim(model, x0, s, k=3, generator=g)
    spread = (every.var() / len(every) + few.var() / len(few)).sqrt()
    assert abs(every.mean() - few.mean()) < 4 * spread, (every.mean(), few.mean(), spread)
    assert prior_nats(x0, s).min() > 0
