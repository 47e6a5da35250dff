"""Fast samplers and classifier-free guidance against closed forms and the DDPM posterior."""
import math

import pytest
import torch

from diffusion.diffusion_utils import make_schedule, predict_x0, q_posterior
from diffusion.model import UNet
from diffusion.samplers import (FIRST_SIGMA, LAST_SIGMA, ddim_step, guidance_timesteps, guided, logsnr_timesteps,
                                sample_ddim, sample_ddpm, sample_dpmpp, spaced_timesteps)
from tests.test_diffusion_utils import gaussian_oracle

F64 = torch.float64


@pytest.fixture(scope="module")
def s():
    return make_schedule("linear", 1000, dtype=F64)


def noise(n=20_000, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_spacing_starts_at_last_trained_step_and_ends_at_zero():
    ts = spaced_timesteps(1000, 20)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 20 and ts == sorted(ts, reverse=True)
    assert spaced_timesteps(1000, 1000) == list(range(999, -1, -1))


def test_dpmpp_grid_is_one_step_to_sigma_8_then_even_in_lambda(s):
    """T-1, then steps - 1 indices whose lambda = -log(sigma) is evenly spaced from sigma 8 to sigma 0.1, each
    within one index's lambda of its target."""
    lam = 0.5 * (s.alpha_bar / (1 - s.alpha_bar)).log()
    gap = torch.cat([lam[1:] - lam[:-1], lam[-1:] - lam[-2:-1]]).abs()  # lambda from index t to its neighbour
    for steps in (5, 10, 20, 50):
        ts = logsnr_timesteps(s, steps)
        assert ts[0] == 999 and len(set(ts)) == steps and ts == sorted(ts, reverse=True)
        want = torch.linspace(-math.log(FIRST_SIGMA), -math.log(LAST_SIGMA), steps - 1, dtype=F64)
        assert ((lam[ts[1:]] - want).abs() <= gap[ts[1:]]).all(), (steps, ts)
    assert logsnr_timesteps(s, 2) == [999, logsnr_timesteps(s, 10)[-1]], "two steps: pure noise, then the last"


@pytest.mark.parametrize("steps,tol", [(100, 0.04), (250, 0.03)])
def test_ddim_with_oracle_recovers_gaussian_data(s, steps, tol):
    mu, std = 0.3, 0.5
    out = sample_ddim(gaussian_oracle(mu, std, s), noise(), s, spaced_timesteps(s.T, steps), clip_x0=False)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=tol)


@pytest.mark.parametrize("steps", [10, 20, 100])
@pytest.mark.parametrize("mu,std", [(0.3, 0.5), (0.0, 0.1)])
def test_dpmpp_with_oracle_ends_at_the_posterior_mean_of_its_last_noise_level(s, steps, mu, std):
    """The last network call is at noise level sigma_last and returns x0's prediction, E[x0 | x]: for Gaussian data
    its std is std^2 / sqrt(std^2 + sigma_last^2). A grid down to t = 0 (sigma 0.01) returns the data's own std."""
    sigma = ((1 - s.alpha_bar) / s.alpha_bar).sqrt()
    for last in (LAST_SIGMA, sigma[0].item()):
        ts = logsnr_timesteps(s, steps, last_sigma=last)
        out = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, ts, clip_x0=False)
        assert out.mean().item() == pytest.approx(mu, abs=0.02)
        assert out.std().item() == pytest.approx(std**2 / (std**2 + sigma[ts[-1]] ** 2).sqrt().item(), rel=0.05)


def test_dpmpp_second_order_beats_first_order_at_few_steps(s):
    """At 10 steps the multistep correction must bring the std closer than DDIM (first order)."""
    mu, std = 0.0, 0.3
    ddim = sample_ddim(gaussian_oracle(mu, std, s), noise(), s, spaced_timesteps(s.T, 10), clip_x0=False).std().item()
    dpm = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, logsnr_timesteps(s, 10), clip_x0=False).std().item()
    assert abs(dpm - std) < abs(ddim - std) / 2


@pytest.mark.parametrize("steps,eta", [(20, 1.0), (50, 1.0), (50, 3.0), (200, 3.0)])
def test_sde_dpmpp_with_oracle_recovers_gaussian_data(s, steps, eta):
    """eta > 1 keeps less of each step's noise and adds more fresh noise: the same marginals q(x_t) in the limit of
    many steps, with a larger error per step (at 20 steps the std is 3.7% off with eta 1, 6% with eta 3)."""
    mu, std = 0.3, 0.5
    out = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, logsnr_timesteps(s, steps), clip_x0=False, eta=eta,
                       generator=torch.Generator().manual_seed(2))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_sde_dpmpp_first_step_is_ddpm_posterior(s):
    """With eta = 1 and no history, a DPM-Solver++ step is a draw from q(x_u | x_t, x0_pred) (= DDIM eta = 1)."""
    model, x = gaussian_oracle(0.3, 0.5, s), noise(100)
    first = []
    sample_dpmpp(model, x, s, logsnr_timesteps(s, 10), eta=1.0, clip_x0=False, generator=torch.Generator().manual_seed(3),
                 callback=lambda i, xt, x0: first.append(xt) if i == 0 else None)
    t, u = logsnr_timesteps(s, 10)[:2]
    tt = torch.full((100,), t)
    eps = model(x, tt)
    mean, std = ddim_step(predict_x0(x, tt, eps, s), eps, s.alpha_bar[t], s.alpha_bar[u], eta=1.0)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.allclose(first[0], mean + std * z, atol=1e-10)


def test_ddim_eta1_consecutive_step_is_ddpm_posterior(s):
    g = torch.Generator().manual_seed(1)
    xt, eps = torch.randn(5, 1, 2, 2, generator=g, dtype=F64), torch.randn(5, 1, 2, 2, generator=g, dtype=F64)
    for t in (1, 7, 300, 999):
        tt = torch.full((5,), t)
        x0 = predict_x0(xt, tt, eps, s)
        mean, std = ddim_step(x0, eps, s.alpha_bar[t], s.alpha_bar[t - 1], eta=1.0)
        post_mean, post_var = q_posterior(x0, xt, tt, s)
        assert torch.allclose(mean, post_mean, atol=1e-10)
        assert std.item() ** 2 == pytest.approx(post_var[0].item(), rel=1e-9)


def test_ddim_eta0_returns_mean_of_point_mass_exactly(s):
    mu = 0.42
    out = sample_ddim(gaussian_oracle(mu, 0.0, s), noise(100), s, spaced_timesteps(s.T, 10), clip_x0=False)
    assert torch.allclose(out, torch.full_like(out, mu), atol=1e-12)


def test_samplers_reproducible_with_generator(s):
    model = gaussian_oracle(0.0, 0.5, s)
    a = sample_ddim(model, noise(50), s, spaced_timesteps(s.T, 20), eta=1.0, generator=torch.Generator().manual_seed(9))
    b = sample_ddim(model, noise(50), s, spaced_timesteps(s.T, 20), eta=1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    for p in model.parameters():  # move off the zero init so outputs depend on every input
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


@torch.no_grad()
def test_guidance_weights_match_formula(net):
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([5, 100, 500, 999])
    y, null = torch.tensor([3, 1, 4, 1]), torch.full((4,), 10)
    eps_c, eps_u = net(x, t, y), net(x, t, null)
    assert torch.allclose(guided(net, y, 0.0, 10)(x, t), eps_u, atol=1e-5)
    assert torch.allclose(guided(net, y, 1.0, 10)(x, t), eps_c, atol=1e-5)
    assert torch.allclose(guided(net, y, 2.5, 10)(x, t), eps_u + 2.5 * (eps_c - eps_u), atol=1e-4)
    assert torch.allclose(guided(net, None, 2.5, 10)(x, t), eps_u, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u, atol=1e-4), "the label must change the prediction"


@torch.no_grad()
def test_autoguidance_replaces_the_unconditional_model_by_the_weak_one_with_labels(net):
    torch.manual_seed(1)
    weak = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    for p in weak.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([3, 1, 4, 1])
    model = guided(net, y, 2.5, 10, guide_t=(100, 500), weak=weak)
    for step in (99, 300):
        t = torch.full((4,), step)
        eps_c, eps_w = net(x, t, y), weak(x, t, y)
        want = eps_w + 2.5 * (eps_c - eps_w) if step >= 100 else eps_c
        assert torch.allclose(model(x, t), want, atol=1e-4), step
    t = torch.full((4,), 300)
    assert not torch.allclose(weak(x, t, y), weak(x, t, torch.full((4,), 10)), atol=1e-4), "labels must matter"
    null = torch.full((4,), 10)  # without labels both networks get the null label
    eps, eps_w = net(x, t, null), weak(x, t, null)
    assert torch.allclose(guided(net, None, 2.5, 10, weak=weak)(x, t), eps_w + 2.5 * (eps - eps_w), atol=1e-4)


@torch.no_grad()
def test_interval_guidance_guides_inside_the_interval_only(net):
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([3, 1, 4, 1])
    model = guided(net, y, 2.5, 10, guide_t=(100, 500))
    for step in (99, 100, 300, 500, 501):
        t = torch.full((4,), step)
        eps_c, eps_u = net(x, t, y), net(x, t, torch.full((4,), 10))
        want = eps_u + 2.5 * (eps_c - eps_u) if 100 <= step <= 500 else eps_c
        assert torch.allclose(model(x, t), want, atol=1e-4), step


def test_guidance_interval_is_read_in_noise_levels():
    s = make_schedule("linear", 1000, dtype=torch.float64)
    sigma = ((1 - s.alpha_bar) / s.alpha_bar).sqrt()
    lo, hi = guidance_timesteps(s, 0.3, 5.0)
    assert sigma[lo] > 0.3 >= sigma[lo - 1] and sigma[hi] <= 5.0 < sigma[hi + 1]
    assert guidance_timesteps(s, 0.0, math.inf) == (0, 999)
    assert guidance_timesteps(s, 1e3, 1e4) == (1, 0), "no t in range: an empty interval"


def test_guided_sampling_runs_on_unet_and_labels_reach_it(net):
    s32 = make_schedule("linear", 100)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ts = logsnr_timesteps(s32, 5)
    out = sample_dpmpp(guided(net, torch.tensor([0, 5, 9]), 2.0, 10), x, s32, ts)
    other = sample_dpmpp(guided(net, torch.tensor([1, 6, 2]), 2.0, 10), x, s32, ts)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, other, atol=1e-4), "the labels must steer the samples"


def test_guidance_sum_is_float32_under_bf16_autocast():
    """w amplifies the difference eps_c - eps_u; in bf16 its rounding error would be amplified too."""
    def net(x, t, y):  # a network whose outputs come back in bf16, as they do under autocast
        return (x * (1 + y.view(-1, 1, 1, 1) / 7)).to(torch.bfloat16)
    x, t, y = torch.randn(4, 1, 5, 5, generator=torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = guided(net, y, 3.0, 10)(x, t)
    eps_c, eps_u = net(x, t, y).float(), net(x, t, torch.full((4,), 10)).float()
    assert out.dtype == torch.float32
    assert torch.equal(out, eps_u + 3.0 * (eps_c - eps_u))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_logsnr_spacing_gives_exactly_the_steps_asked(kind):
    for T in (50, 100, 1000):
        s = make_schedule(kind, T, dtype=F64)
        for steps in sorted({1, 2, 3, 5, 10, 20, 49, 50, 94, 100, T // 2, T - 1, T} - {0}):
            if steps > T:
                continue
            ts = logsnr_timesteps(s, steps)
            assert len(ts) == steps and len(set(ts)) == steps, (kind, T, steps, ts)
            assert ts[0] == T - 1 and all(a > b >= 0 for a, b in zip(ts, ts[1:]))


def all_sampler_runs(s):
    """(name, sampler, timesteps, kwargs) for every sampler and noise setting."""
    yield "ddpm", sample_ddpm, None, {}
    for eta in (0.0, 1.0):
        yield f"ddim eta={eta}", sample_ddim, spaced_timesteps(s.T, 10), {"eta": eta}
        yield f"dpmpp eta={eta}", sample_dpmpp, logsnr_timesteps(s, 10), {"eta": eta}
    yield "dpmpp eta=3.0", sample_dpmpp, logsnr_timesteps(s, 10), {"eta": 3.0}


def test_point_mass_oracle_x0_is_exact_at_every_step(s):
    """For data = a single point, the oracle's eps gives x0 = the point at the t it was asked about:
    a sampler that calls the model at t but converts eps -> x0 at t +- 1 misses it."""
    point = 0.37
    for name, sampler, ts, kwargs in all_sampler_runs(s):
        seen = []
        sampler(gaussian_oracle(point, 0.0, s), noise(64), s, ts, clip_x0=False, generator=torch.Generator().manual_seed(0),
                callback=lambda i, xt, x0: seen.append(x0), **kwargs)
        assert len(seen) == (s.T if ts is None else len(ts)), name
        worst = max((x0 - point).abs().max().item() for x0 in seen)
        assert worst < 1e-9, f"{name}: x0 prediction off the point by {worst}"


def flow_exact(s, x, t_from, t_to, mu, std):
    """The probability-flow ODE's exact map for x_0 ~ N(mu, std^2): marginals stay Gaussian, and the
    flow moves each point by its z-score, x_u = m_u + s_u (x_t - m_t) / s_t."""
    def moments(t):
        alpha_bar = s.alpha_bar[t]
        return alpha_bar.sqrt() * mu, (alpha_bar * std**2 + 1 - alpha_bar).sqrt()
    (m_t, s_t), (m_u, s_u) = moments(t_from), moments(t_to)
    return m_u + s_u * (x - m_t) / s_t


def uneven_timesteps(s, steps: int) -> list[int]:
    """Steps alternating 1:3 in lambda: uneven everywhere, so a multistep solver must use each step's ratio."""
    alpha_bar = s.alpha_bar.double()
    lam = 0.5 * (alpha_bar / (1 - alpha_bar)).log()
    widths = torch.tensor([1.0, 3.0], dtype=F64).repeat(steps // 2)
    targets = lam[-1] + (lam[0] - lam[-1]) * torch.cat([torch.zeros(1, dtype=F64), widths.cumsum(0) / widths.sum()])
    return sorted(set((lam[None] - targets[:, None]).abs().argmin(1).tolist()), reverse=True)


def ode_error(sampler, s, steps, mu=0.3, std=0.5):
    """Max error against the exact flow at t = 0, the last point the ODE reaches before the final denoise."""
    ts, x, landed = uneven_timesteps(s, steps), noise(200), {}
    sampler(gaussian_oracle(mu, std, s), x, s, ts, clip_x0=False, callback=lambda i, xt, x0: landed.update({i: xt}))
    return (landed[len(ts) - 2] - flow_exact(s, x, ts[0], ts[-1], mu, std)).abs().max().item()


@pytest.fixture(scope="module")
def s_fine():
    return make_schedule("linear", 4000, dtype=F64)  # fine enough that integer timesteps keep the 1:3 pattern


@pytest.mark.parametrize("sampler,order", [(sample_ddim, 1), (sample_dpmpp, 2)])
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(s_fine, sampler, order):
    errors = [ode_error(sampler, s_fine, n) for n in (32, 64, 128)]
    rates = [a / b for a, b in zip(errors, errors[1:])]  # 2 ** order when the step count doubles
    assert all(2 ** order * 0.8 < r < 2 ** order * 1.25 for r in rates), (errors, rates)


def test_dpmpp_multistep_step_matches_lu_et_al_algorithm_2(s):
    """The second step, recomputed from the paper's symbols: r_i = h_{i-1} / h_i,
    D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i."""
    model, x = gaussian_oracle(0.3, 0.5, s), noise(50)
    ts = [999, 700, 200, 0]
    states, x0s = [x], []
    sample_dpmpp(model, x, s, ts, clip_x0=False, callback=lambda i, xt, x0: (states.append(xt), x0s.append(x0)))
    alpha, sigma = s.alpha_bar.sqrt(), (1 - s.alpha_bar).sqrt()
    lam = (alpha / sigma).log()
    h_prev, h = lam[ts[1]] - lam[ts[0]], lam[ts[2]] - lam[ts[1]]
    r = h_prev / h
    d = (1 + 1 / (2 * r)) * x0s[1] - 1 / (2 * r) * x0s[0]
    expected = sigma[ts[2]] / sigma[ts[1]] * states[1] - alpha[ts[2]] * (torch.exp(-h) - 1) * d
    assert torch.allclose(states[2], expected, atol=1e-12)


@pytest.mark.parametrize("schedule,sigmas", [("cosine", [4.61, 2.67, 1.55, 0.89, 0.52]),
                                             ("linear", [4.62, 2.68, 1.54, 0.89, 0.52])])
def test_default_sampler_guides_five_of_its_ten_steps(schedule, sigmas):
    """The README's cost claim: the default dpmpp-10 with the autoguided interval (0.4, 5] guides only the steps at
    sigma = 4.6 to 0.52 (the grid's sigmas at each schedule's nearest integer t), so a batch of 16 costs 15 network
    passes (5 single, 5 doubled), not 20."""
    from diffusion.config import ModelConfig, SampleConfig
    from diffusion.diffusion_utils import schedule_from_config
    from diffusion.recipe import AUTOGUIDED, choose_recipe
    from diffusion.samplers import sampler_timesteps

    model_cfg = ModelConfig(schedule=schedule)
    s = schedule_from_config(model_cfg)
    cfg = choose_recipe(model_cfg, SampleConfig(guide_checkpoint="none", guidance=AUTOGUIDED.guidance,
                                                eta=AUTOGUIDED.eta, guidance_interval=AUTOGUIDED.interval),
                        task="sample", labelled=True)
    batches = []

    def spy(x, t, y):
        batches.append(len(x))
        return torch.zeros_like(x)
    ts = sampler_timesteps(cfg.sampler, s, cfg.steps)
    model = guided(spy, torch.arange(16) % 10, cfg.guidance, 10, guide_t=guidance_timesteps(s, *cfg.interval))
    sample_dpmpp(model, torch.randn(16, 1, 28, 28), s, ts, eta=cfg.eta)
    sigma = ((1 - s.alpha_bar) / s.alpha_bar).sqrt()
    guided_sigmas = [round(float(sigma[t]), 2) for t, b in zip(ts, batches) if b == 32]
    assert guided_sigmas == sigmas and batches.count(16) == 5
