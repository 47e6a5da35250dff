"""The DDPM math against closed forms, in float64 on tiny shapes."""
import math

import pytest
import torch

from diffusion.diffusion_utils import (diffusion_loss, draw_t, lognormal_t_probs, make_schedule, min_snr_weights,
                                       mix_with_uniform, preconditioning, predict_eps, predict_x0, q_posterior, q_sample,
                                       target_weights, values_at)
from diffusion.samplers import sample_ddpm
from tests.conftest import each_in_its_part

F64 = torch.float64


def p_mean_algorithm2(xt, t, eps, s):
    """Algorithm 2's mean, as the paper writes it: (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t), Eq. 11."""
    at = lambda v: values_at(v, t, xt)  # noqa: E731
    return (xt - at(s.beta) / (1 - at(s.alpha_bar)).sqrt() * eps) / at(s.alpha).sqrt()


@pytest.fixture(scope="module")
def s():
    return make_schedule("linear", 1000, dtype=F64)


def gaussian_oracle(mu: float, std: float, s):
    """The optimal eps(x_t, t) = E[eps | x_t] when x_0 ~ N(mu, std^2): x_t is jointly Gaussian with eps."""
    def model(xt, t):
        alpha_bar = s.alpha_bar[t].view(-1, *([1] * (xt.dim() - 1)))
        return (1 - alpha_bar).sqrt() * (xt - alpha_bar.sqrt() * mu) / (alpha_bar * std**2 + 1 - alpha_bar)
    return model


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_identities(kind):
    s = make_schedule(kind, 1000, dtype=F64)
    assert torch.allclose(s.alpha_bar, torch.cumprod(1 - s.beta, 0))
    assert torch.allclose(s.alpha, 1 - s.beta)
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1]), "alpha_bar must strictly decrease"
    assert s.alpha_bar_prev[0] == 1 and torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert s.posterior_var[0] == 0  # q(x_0 | x_1, x_0) is a point mass
    assert s.alpha_bar[-1] < 1e-4, "x_T must be close to N(0, I)"


def test_linear_schedule_matches_paper(s):
    assert s.beta[0].item() == pytest.approx(1e-4) and s.beta[-1].item() == pytest.approx(0.02)
    closed = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s.alpha_bar[-1].item() == pytest.approx(closed, rel=1e-9)
    assert s.alpha_bar[-1].item() == pytest.approx(4.0e-5, rel=0.02)


def test_schedule_stored_float32_by_default():
    assert make_schedule().beta.dtype == torch.float32


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_q_sample_moments_match_iterated_forward_process(s, t):
    mu0, var0 = 0.7, 0.0  # a point mass at 0.7
    mean, var = mu0, var0
    for i in range(t + 1):  # iterate q(x_i | x_{i-1}) = N(sqrt(alpha_i) x_{i-1}, beta_i)
        mean, var = s.alpha[i].sqrt().item() * mean, s.alpha[i].item() * var + s.beta[i].item()
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1), mu0, dtype=F64)
    xt = q_sample(x0, torch.full((n,), t), torch.randn(n, 1, generator=g, dtype=F64), s)
    se = math.sqrt(var / n)
    assert abs(xt.mean().item() - mean) < 5 * se
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("t", [1, 2, 100, 999])
def test_posterior_matches_bayes_rule(s, t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): precisions add, means weight by precision."""
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    a, b, alpha_bar_prev = s.alpha[t], s.beta[t], s.alpha_bar[t - 1]
    prec_lik, prec_prior = a / b, 1 / (1 - alpha_bar_prev)  # x_t = sqrt(a) x_{t-1} + sqrt(b) eps
    var = 1 / (prec_lik + prec_prior)
    mean = var * (a.sqrt() / b * xt + alpha_bar_prev.sqrt() / (1 - alpha_bar_prev) * x0)
    got_mean, got_var = q_posterior(x0, xt, torch.full((4,), t), s)
    assert torch.allclose(got_mean, mean, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_var.flatten(), var.expand(4), rtol=1e-10)


def test_predict_x0_round_trip(s):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(8, 1, 4, 4, generator=g, dtype=F64) * 2 - 1, torch.randn(8, 1, 4, 4, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 5, 50, 300, 600, 900, 999])
    xt = q_sample(x0, t, eps, s)
    assert torch.allclose(predict_x0(xt, t, eps, s), x0, atol=1e-9)
    assert torch.allclose(predict_eps(xt, t, x0, s), eps, atol=1e-9)


def test_algorithm2_mean_equals_posterior_mean_at_predicted_x0(s):
    g = torch.Generator().manual_seed(2)
    xt, eps = torch.randn(6, 1, 3, 3, generator=g, dtype=F64), torch.randn(6, 1, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 10, 400, 800, 999])
    mean, _ = q_posterior(predict_x0(xt, t, eps, s), xt, t, s)
    assert torch.allclose(p_mean_algorithm2(xt, t, eps, s), mean, atol=1e-9)


def test_ddpm_sampler_with_oracle_recovers_gaussian_data(s):
    mu, std = 0.3, 0.5
    x = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = sample_ddpm(gaussian_oracle(mu, std, s), x, s, generator=torch.Generator().manual_seed(4), clip_x0=False)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.04)


def test_ddpm_beta_variance_option_also_recovers_data(s):
    mu, std = -0.2, 0.4
    x = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    out = sample_ddpm(gaussian_oracle(mu, std, s), x, s, generator=torch.Generator().manual_seed(6),
                      clip_x0=False, variance="beta")
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.06)


def test_loss_is_the_mse_of_the_eps_the_model_received_at_the_t_it_received(s):
    """A spy reconstructs eps from (x_t, t, x0) and answers half of it: the loss must be mean(eps^2) / 4.
    Training the model at t while noising at t +- 1 makes the reconstruction, and so the loss, disagree."""
    s32 = make_schedule("linear", 1000)
    x0 = torch.rand(4096, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = {}

    def spy(xt, t):
        eps = predict_eps(xt, t, x0, s32)
        seen.update(t=t, eps=eps)
        return 0.5 * eps

    loss = diffusion_loss(spy, x0, s32, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(0.25 * seen["eps"].pow(2).mean().item(), rel=1e-5)
    assert seen["eps"].std().item() == pytest.approx(1.0, abs=0.03), "eps must be standard normal"
    t = seen["t"]
    assert t.dtype == torch.long and t.min() == 0 and t.max() == s32.T - 1, "every t in 0..T-1 is trained"


def test_min_snr_weighted_loss_weighs_each_image_by_min_snr_over_snr_at_its_t():
    """The spy answers eps + 1 for every image, so each image's squared error is exactly 1 and the weighted loss is
    the mean over the batch of min(SNR_t, gamma) / SNR_t, SNR_t = alpha_bar / (1 - alpha_bar), at the t it drew."""
    s32 = make_schedule("linear", 1000)
    x0 = torch.rand(512, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = {}

    def spy(xt, t):
        seen["t"] = t
        return predict_eps(xt, t, x0, s32) + 1

    weights = min_snr_weights(s32, 5.0)
    loss = diffusion_loss(spy, x0, s32, torch.Generator().manual_seed(1), weights)
    ab = s32.alpha_bar.double()[seen["t"]]
    snr = ab / (1 - ab)
    assert loss.item() == pytest.approx((snr.clamp(max=5) / snr).mean().item(), rel=1e-4)
    assert weights[-1] == 1 and weights[0] < 0.01, "noisy steps keep weight 1, the cleanest weigh gamma / SNR"
    plain = diffusion_loss(spy, x0, s32, torch.Generator().manual_seed(1))
    assert diffusion_loss(spy, x0, s32, torch.Generator().manual_seed(1), min_snr_weights(s32, math.inf)).item() == \
        pytest.approx(plain.item(), rel=1e-6), "gamma = inf is L_simple"


def test_v_prediction_reads_back_as_eps(s):
    """sigma_data 1: a network answering -v = -(sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0) (Salimans & Ho 2022,
    Sec. 4) on the unscaled x_t gives back exactly the eps that made x_t."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 3, 3, generator=g, dtype=F64), torch.randn(6, 1, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 10, 400, 800, 999])
    xt, ab = q_sample(x0, t, eps, s), values_at(s.alpha_bar, t, x0)
    c_in, c_xt, c_net = (values_at(c, t, x0) for c in preconditioning(s.alpha_bar, 1.0))
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert torch.allclose(c_in, torch.ones_like(c_in))
    assert torch.allclose(c_xt * xt + c_net * -v, eps, atol=1e-9)


@pytest.mark.parametrize("sigma_data", [0.62, 0.3])
def test_edm_preconditioning_is_karras_table_1_on_the_scaled_x(s, sigma_data):
    """EDM's own formulas in its variables, x = x_t / sqrt(alpha_bar) = x0 + sigma eps: the network sees c_in x, and
    with F = (x0 - c_skip x) / c_out, D = c_skip x + c_out F is x0; read back as eps it is the eps that made x_t.
    Its target F has unit variance at every noise level for data of std sigma_data."""
    g = torch.Generator().manual_seed(1)
    x0 = sigma_data * torch.randn(4000, 1, 1, 1, generator=g, dtype=F64)
    eps = torch.randn(4000, 1, 1, 1, generator=g, dtype=F64)
    for step in (0, 50, 300, 999):
        t = torch.full((4000,), step)
        xt, ab = q_sample(x0, t, eps, s), s.alpha_bar[step]
        sigma, x = ((1 - ab) / ab).sqrt(), xt / ab.sqrt()
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        target = (x0 - c_skip * x) / c_out
        c_in, c_xt, c_net = (c[step] for c in preconditioning(s.alpha_bar, sigma_data))
        assert torch.allclose(c_in * xt, x / (sigma**2 + sigma_data**2).sqrt())
        assert torch.allclose(c_xt * xt + c_net * target, eps, atol=1e-8)
        assert target.std().item() == pytest.approx(1.0, abs=0.05)


def test_target_weights_make_the_eps_loss_the_loss_on_the_network_output(s):
    """eps_pred - eps = c_net (F_pred - F): the eps loss weighted by 1 / c_net^2 equals F's plain squared error."""
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 3, 200, 999])
    _, c_xt, c_net = preconditioning(s.alpha_bar, 0.62)
    xt, f_true, f_pred = (torch.randn(4, 1, 2, 2, generator=g, dtype=F64) for _ in range(3))
    eps_of = lambda f: values_at(c_xt, t, xt) * xt + values_at(c_net, t, xt) * f  # noqa: E731
    eps_error = (eps_of(f_pred) - eps_of(f_true)).square().flatten(1).mean(1)
    assert torch.allclose(eps_error * target_weights(c_net)[t], (f_pred - f_true).square().flatten(1).mean(1))


@pytest.mark.parametrize("kind,T", [("linear", 1000), ("cosine", 1000), ("linear", 4000)])
def test_lognormal_noise_levels_make_ln_sigma_the_normal_asked_for(kind, T):
    """Under t ~ lognormal_t_probs, ln sigma_t has the asked mean and std (the schedule's sigma range, 0.01 to
    157 for the paper's, cuts off under 0.1% of the normal), whatever the schedule and T."""
    s = make_schedule(kind, T, dtype=F64)
    probs = lognormal_t_probs(s, -0.98, 1.2).double()
    log_sigma = 0.5 * torch.log((1 - s.alpha_bar) / s.alpha_bar)
    mean = (probs * log_sigma).sum()
    std = (probs * (log_sigma - mean) ** 2).sum().sqrt()
    assert probs.sum().item() == pytest.approx(1, abs=1e-6) and (probs >= 0).all()
    assert mean.item() == pytest.approx(-0.98, abs=0.03) and std.item() == pytest.approx(1.2, abs=0.03)


def test_a_mixture_with_uniform_draws_that_share_from_the_given_levels():
    """share w of the probability follows probs, the rest is spread evenly: P(t) = (1 - w) / T + w probs[t]."""
    probs = torch.zeros(1000, dtype=F64)
    probs[[3, 900]] = torch.tensor([0.2, 0.8], dtype=F64)
    mixed = mix_with_uniform(probs, 0.25)
    assert mixed.sum().item() == pytest.approx(1)
    assert mixed[3].item() == pytest.approx(0.75e-3 + 0.05) and mixed[900].item() == pytest.approx(0.75e-3 + 0.2)
    assert mixed[500].item() == pytest.approx(0.75e-3)
    assert torch.equal(mix_with_uniform(probs, 1.0), probs)


def test_the_loss_trains_the_t_drawn_from_t_probs():
    s32 = make_schedule("linear", 1000)
    x0 = torch.zeros(256, 1, 2, 2)
    seen = {}

    def spy(xt, t):
        seen["t"] = t
        return xt

    probs = torch.zeros(1000)
    probs[[17, 600]] = torch.tensor([0.25, 0.75])
    diffusion_loss(spy, x0, s32, torch.Generator().manual_seed(1), t_probs=probs)
    assert set(seen["t"].tolist()) == {17, 600} and 0.65 < (seen["t"] == 600).float().mean() < 0.85


def test_linear_betas_scale_with_T_and_keep_the_paper_at_1000():
    for T in (50, 100, 1000, 4000):
        beta = make_schedule("linear", T, dtype=F64).beta
        assert beta[0].item() == pytest.approx(1e-4 * 1000 / T) and beta[-1].item() == pytest.approx(0.02 * 1000 / T)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_every_T_the_config_accepts_ends_in_noise(kind):
    """x_T ~ N(0, I) is where every sampler starts: the config refuses any T whose schedule leaves signal."""
    from diffusion.config import MAX_FINAL_ALPHA_BAR, ModelConfig
    from diffusion.errors import UserError

    accepted = []
    for beta_end in (0.02, 0.01, 0.005):
        for T in range(1, 2001):
            try:
                ModelConfig(timesteps=T, schedule=kind, beta_end=beta_end)
            except UserError:
                continue
            s = make_schedule(kind, T, beta_end=beta_end, dtype=F64)
            assert 0 < s.beta.min() and s.beta.max() < 1, (kind, T, beta_end)
            assert s.alpha_bar[-1] <= MAX_FINAL_ALPHA_BAR, (kind, T, beta_end, s.alpha_bar[-1].item())
            accepted.append(T)
    assert 1000 in accepted and 50 in accepted


@pytest.mark.parametrize("n,T", [(1000, 1000), (4, 1000), (7, 50)])
def test_stratified_t_takes_the_i_th_from_the_i_th_of_n_equal_parts(n, T):
    """t_i = floor((u + i) / n * T): with n = T that is every t once, in order, whatever u; else t_i lies in
    [i T / n, (i + 1) T / n)."""
    for seed in range(5):
        t = draw_t(n, T, torch.Generator().manual_seed(seed), stratified=True)
        assert each_in_its_part(t, T).all()
        if n == T:
            assert torch.equal(t, torch.arange(n))


def test_stratified_t_keeps_each_draws_distribution_and_spreads_every_batch():
    """Pooled over batches, the t follow t_probs (uniform, or skewed with a zero); within every batch of 100 each t
    occurs within 1 of 100 P(t) times, where independent draws miss that by about sqrt(100 P (1 - P))."""
    g = torch.Generator().manual_seed(0)
    uniform = torch.cat([draw_t(4, 10, g, stratified=True) for _ in range(5000)])
    assert torch.allclose(torch.bincount(uniform, minlength=10) / len(uniform), torch.full((10,), 0.1), atol=0.01)
    probs = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    batches = [draw_t(100, 5, g, t_probs=probs, stratified=True) for _ in range(200)]
    counts = torch.stack([torch.bincount(t, minlength=5) for t in batches]).float()
    assert ((counts - 100 * probs).abs() <= 1).all() and counts[:, 2].sum() == 0
    independent = torch.stack([torch.bincount(draw_t(100, 5, g, t_probs=probs), minlength=5) for _ in range(200)])
    assert ((independent - 100 * probs).abs() > 1).any(dim=1).float().mean() > 0.5
