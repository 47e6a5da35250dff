"""What differs on the laptops we are written for: Apple MPS (no float64) and Windows (no folder fsync)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusion.diffusion_utils import make_schedule
from diffusion.model import UNet
from diffusion.samplers import SAMPLERS, guided, sampler_timesteps
from diffusion.train import TrainingRun
from tests.conftest import run_cli
from tests.test_resume_and_faults import start_training, tiny_cfg


class NoFloat64(TorchDispatchMode):
    """Fails on any op that reads or makes a float64 tensor, as Apple's MPS backend does."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves((args, kwargs, out)):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise AssertionError(f"{func} uses float64, which MPS does not have")
        return out


def test_the_guard_itself_catches_float64():
    try:
        with NoFloat64():
            torch.ones(2).double()
    except AssertionError:
        return
    raise AssertionError("NoFloat64 let a float64 op through")


def test_every_sampler_loop_runs_without_float64():
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), attention_resolutions=(14,), num_classes=10).eval()
    schedule = make_schedule("linear", 50)
    model = guided(net, torch.tensor([1, 7]), 2.0, 10)
    for name, sampler in SAMPLERS.items():
        timesteps = sampler_timesteps(name, schedule, 5)  # float64 here is fine: CPU, before the loop
        x = torch.randn(2, 1, 28, 28)
        with NoFloat64():
            noise = {} if name == "ddpm" else {"eta": 1.0}
            out = sampler(model, x, schedule, timesteps, generator=torch.Generator().manual_seed(0), **noise)
        assert torch.isfinite(out).all(), name


def test_inpainting_and_interpolated_noise_run_without_float64():
    from diffusion.config import ModelConfig
    from diffusion.editing import inpaint
    from diffusion.generation import interpolation_noise

    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=(1, 2), num_classes=10).eval()
    schedule = make_schedule("linear", 50)
    timesteps = sampler_timesteps("dpmpp", schedule, 5)
    x_T = interpolation_noise(ModelConfig(timesteps=50), 2, seed=0)  # slerp's float64 stays on the CPU, before sampling
    keep = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    keep[..., :14, :] = True
    model = guided(net, torch.tensor([1, 7]), 2.0, 10, guide_t=(0, 20))
    with NoFloat64():
        out = inpaint(model, x_T.float(), schedule, timesteps, torch.zeros(2, 1, 28, 28), keep,
                      generator=torch.Generator().manual_seed(0), resample=2)
    assert x_T.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("flags", [(), ("--noise-levels", "lognormal", "--ema-length", "0.1", "--ema-lengths", "0.05",
                                    "--prediction", "edm"), ("--noise-levels", "mixed")])
def test_training_step_runs_without_float64(data_root, tmp_path, flags):
    run = TrainingRun(tiny_cfg(data_root, tmp_path, *flags))
    x0, y = run.images[:16].float() / 127.5 - 1, run.labels[:16]
    with NoFloat64():
        for _ in range(2):
            loss = run.train_step(x0, y)
    assert torch.isfinite(loss)


# Windows refuses os.open on a folder (PermissionError); simulate that in a child process
NO_FOLDER_OPEN = """
import os
_real_open = os.open
def _open(path, flags, *args, **kwargs):
    if os.path.isdir(path):
        raise PermissionError(13, "Access is denied", str(path))
    return _real_open(path, flags, *args, **kwargs)
os.open = _open
"""


def test_checkpoints_are_written_where_folders_cannot_be_opened(data_root, tmp_path):
    proc = start_training(data_root, tmp_path, "--epochs", "2", "--save-every", "3steps", prelude=NO_FOLDER_OPEN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["epoch_001.pth", "epoch_002.pth"]
    assert (tmp_path / "latest").read_text().strip() == "epoch_002.pth"
    res = run_cli("diffusion.sampling", "--ckpt-dir", str(tmp_path), "--num-images", "2", "--output", str(tmp_path / "g.png"))
    assert res.returncode == 0, res.stderr
