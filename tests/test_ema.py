"""Power-function EMA tracks (EDM2): the exponent for a relative length, the exact weights a track gives each step,
and tracks that survive a checkpoint."""
import pytest
import torch

from diffusion.ema import EmaTracks, beta, gamma_of


def rel_std(gamma: float) -> float:
    """EDM2 Eq. 2: the relative std of the weighting t^gamma over a run."""
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


@pytest.mark.parametrize("gamma", [0.5, 6.94, 8.0, 16.97, 40.0])
def test_gamma_of_inverts_the_relative_std(gamma):
    assert gamma_of(rel_std(gamma)) == pytest.approx(gamma, rel=1e-6)
    assert rel_std(8.0) == pytest.approx(3 / (10 * 11 ** 0.5))


def test_a_track_is_the_power_weighted_average_of_every_step():
    """With beta_n = (1 - 1/n)^(gamma+1), step i's weights end up with weight (i^(g+1) - (i-1)^(g+1)) / n^(g+1)
    after n steps: the discrete form of t^gamma. A parameter that is i at step i must average to exactly that."""
    net = torch.nn.Linear(1, 1, bias=False)
    tracks = EmaTracks(net, (0.05, 0.2))
    n = 300
    for i in range(1, n + 1):
        net.weight.data.fill_(float(i))
        tracks.update(i)
    for name, gamma in tracks.gammas.items():
        i = torch.arange(1, n + 1, dtype=torch.float64)
        weights = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
        assert weights.sum().item() == pytest.approx(1.0)
        assert tracks.tracks[name][0].item() == pytest.approx((weights * i).sum().item(), rel=1e-5), name
    short, long = (tracks.tracks[k][0].item() for k in ("0.05", "0.2"))
    assert long < short < n, "a longer track reaches further back"
    assert beta(1, 3.0) == 0


def test_tracks_round_trip_through_a_state_dict():
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.GroupNorm(1, 3))
    tracks = EmaTracks(net, (0.1,))
    for step in range(1, 6):
        for p in net.parameters():
            p.data.add_(1.0)
        tracks.update(step)
    state = tracks.state_dict()
    assert set(state) == {"0.1"} and set(state["0.1"]) == set(net.state_dict())
    fresh = EmaTracks(net, (0.1,))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.tracks["0.1"], tracks.tracks["0.1"]))
    assert not torch.equal(tracks.tracks["0.1"][0], net[0].weight), "the track lags the weights"


def test_sampling_ema_of_a_length_is_the_track_of_that_length(data_root, tmp_path):
    """--ema-length s makes the EMA that sampling uses the power-function EMA that --ema-lengths s keeps beside it."""
    from diffusion.checkpoint import load_checkpoint
    from tests.conftest import TINY, run_cli
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--sample-every", "0", "--ema-length", "0.1",
                  "--ema-lengths", "0.1", "0.3", "--data-root", str(data_root), "--ckpt-dir", str(tmp_path),
                  "--out-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    state = load_checkpoint(tmp_path / "epoch_001.pth")
    for name, value in state["ema"].items():
        assert torch.allclose(value, state["ema_tracks"]["0.1"][name], atol=1e-6), name
    assert not all(torch.allclose(v, state["ema_tracks"]["0.3"][k], atol=1e-6) for k, v in state["ema"].items())
