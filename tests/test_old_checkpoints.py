"""A checkpoint written by the previous version (format 2: one flat config of every setting) still loads and draws
exactly the images that version drew. tests/fixtures/format2_tiny.pth and its PNGs were written by that version
(commit 5ed95f0) with `python -m diffusion.sampling --checkpoint ... --amp none --memory-format contiguous`."""
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import load_checkpoint, load_network
from tests.conftest import png_pixels, run_inprocess

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD = FIXTURES / "format2_tiny.pth"
SAME = ["--amp", "none", "--memory-format", "contiguous", "--num-images", "4"]


def test_the_fixture_is_a_format_2_checkpoint():
    state = load_checkpoint(OLD)
    assert state["format"] == 2 and "config" in state and "model_config" not in state
    assert "sample_steps" in state["config"], "format 2 stored the run's sampling settings too"


def test_a_format_2_checkpoint_loads_with_what_training_fixed():
    loaded = load_network(OLD)
    assert (loaded.config.base_channels, loaded.config.channel_mults, loaded.config.timesteps) == (8, (1,), 50)
    assert loaded.config.learned_unconditional and loaded.epoch == 1


@pytest.mark.parametrize("name,flags", [
    ("sample", []),
    ("interpolate", ["--interpolate", "--digit", "7"]),
    ("inpaint", ["--inpaint", str(FIXTURES / "format2_digit.png"), "--guide-checkpoint", "none"]),
    ("uncond", ["--unconditional", "--sampler", "ddim", "--steps", "5", "--guide-checkpoint", str(OLD)]),
])
def test_a_format_2_checkpoint_draws_the_images_the_previous_version_drew(tmp_path, capsys, name, flags):
    out = tmp_path / f"{name}.png"
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(OLD), *SAME, *flags, "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert torch.equal(png_pixels(out), png_pixels(FIXTURES / f"format2_tiny_{name}.png"))
