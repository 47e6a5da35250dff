"""Fast samplers and classifier-free guidance against closed forms and the DDPM posterior."""
import pytest
import torch

from diffusion.diffusion_utils import make_schedule, predict_x0, q_posterior
from diffusion.model import UNet
from diffusion.samplers import ddim_step, guided, logsnr_timesteps, sample_ddim, sample_dpmpp, spaced_timesteps
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


def test_logsnr_spacing_starts_at_last_step_and_never_repeats(s):
    for steps in (5, 20, 200):
        ts = logsnr_timesteps(s, steps)
        assert ts[0] == 999 and ts[-1] == 0 and len(ts) == len(set(ts)) and ts == sorted(ts, reverse=True)
    assert len(logsnr_timesteps(s, 20)) == 20


@pytest.mark.parametrize("steps,tol", [(100, 0.04), (250, 0.03)])
def test_ddim_with_oracle_recovers_gaussian_data(s, steps, tol):
    mu, std = 0.3, 0.5
    out = sample_ddim(gaussian_oracle(mu, std, s), noise(), s, steps, clip_x0=False)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=tol)


@pytest.mark.parametrize("steps", [10, 20, 100])
@pytest.mark.parametrize("mu,std", [(0.3, 0.5), (0.0, 0.1)])
def test_dpmpp_with_oracle_recovers_gaussian_data(s, steps, mu, std):
    out = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, steps, clip_x0=False)
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_dpmpp_second_order_beats_first_order_at_few_steps(s):
    """At 10 steps the multistep correction must bring the std closer than DDIM (first order)."""
    mu, std = 0.0, 0.3
    ddim = sample_ddim(gaussian_oracle(mu, std, s), noise(), s, 10, clip_x0=False).std().item()
    dpm = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, 10, clip_x0=False).std().item()
    assert abs(dpm - std) < abs(ddim - std) / 2


@pytest.mark.parametrize("steps", [20, 50])
def test_sde_dpmpp_with_oracle_recovers_gaussian_data(s, steps):
    mu, std = 0.3, 0.5
    out = sample_dpmpp(gaussian_oracle(mu, std, s), noise(), s, steps, clip_x0=False, eta=1.0,
                       generator=torch.Generator().manual_seed(2))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_sde_dpmpp_first_step_is_ddpm_posterior(s):
    """With eta = 1 and no history, a DPM-Solver++ step is a draw from q(x_u | x_t, x0_pred) (= DDIM eta = 1)."""
    model, x = gaussian_oracle(0.3, 0.5, s), noise(100)
    first = []
    sample_dpmpp(model, x, s, 10, eta=1.0, clip_x0=False, generator=torch.Generator().manual_seed(3),
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
    out = sample_ddim(gaussian_oracle(mu, 0.0, s), noise(100), s, 10, clip_x0=False)
    assert torch.allclose(out, torch.full_like(out, mu), atol=1e-12)


def test_samplers_reproducible_with_generator(s):
    model = gaussian_oracle(0.0, 0.5, s)
    a = sample_ddim(model, noise(50), s, 20, eta=1.0, generator=torch.Generator().manual_seed(9))
    b = sample_ddim(model, noise(50), s, 20, eta=1.0, generator=torch.Generator().manual_seed(9))
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


def test_guided_sampling_runs_on_unet(net):
    s32 = make_schedule("linear", 100)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = sample_dpmpp(guided(net, torch.tensor([0, 5, 9]), 2.0, 10), x, s32, 5)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() <= 1
