"""Inpainting and interpolation against what they must do exactly, and against a two-image oracle."""
import math

import pytest
import torch
from PIL import Image

from diffusion.diffusion_utils import make_schedule
from diffusion.editing import inpaint, slerp
from diffusion.model import UNet
from diffusion.samplers import logsnr_timesteps, sample_ddim
from tests.conftest import SAME_PRECISION, digit_png, grid_cells, inpainting_cells, png_pixels, run_cli, run_inprocess

S = make_schedule("linear", 100)


def two_image_oracle(a: torch.Tensor, b: torch.Tensor, s):
    """The exact eps of data that is image a or image b with equal chance: E[x0 | x_t] weighs a and b by
    N(x_t; sqrt(alpha_bar) x0, (1 - alpha_bar) I)."""
    def model(xt, t):
        ab = s.alpha_bar[t].view(-1, *[1] * (xt.dim() - 1))
        logits = torch.stack([-(xt - ab.sqrt() * c).flatten(1).square().sum(1) / (2 * (1 - ab.flatten()))
                              for c in (a, b)], 1)
        w = logits.softmax(1).view(-1, 2, *[1] * (xt.dim() - 1))
        x0 = w[:, 0] * a + w[:, 1] * b
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
    return model


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_classes=0).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    return lambda x, t: model(x, t, None)


@pytest.mark.parametrize("eta,resample", [(1.0, 1), (1.0, 3), (0.0, 2)])
def test_kept_pixels_come_back_unchanged(net, eta, resample):
    known = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    keep = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    keep[..., :14, :] = True  # the top half is kept, the bottom half generated
    x = torch.randn(known.shape, generator=torch.Generator().manual_seed(2))
    out = inpaint(net, x, S, logsnr_timesteps(S, 6), known, keep, generator=torch.Generator().manual_seed(3),
                  eta=eta, resample=resample)
    assert torch.equal(out[..., :14, :], known[..., :14, :])
    assert not torch.allclose(out[..., 14:, :], known[..., 14:, :], atol=0.1), "the rest is generated"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_with_nothing_kept_it_is_plain_ddim_sampling(net, eta):
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ts = logsnr_timesteps(S, 8)
    plain = sample_ddim(net, x, S, ts, generator=torch.Generator().manual_seed(5), eta=eta)
    filled = inpaint(net, x, S, ts, torch.zeros_like(x), torch.zeros(1, 1, 28, 28, dtype=torch.bool),
                     generator=torch.Generator().manual_seed(5), eta=eta)
    assert torch.equal(plain, filled)


def test_the_generated_half_agrees_with_the_kept_half():
    """Data is image a or image b, which differ in both halves. Keeping a's top half must give a's bottom half,
    where plain sampling gives b half of the time: the kept pixels have to steer the rest."""
    a = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 1, 2, 2)
    b = -a
    s = make_schedule("linear", 1000)
    model, ts = two_image_oracle(a, b, s), logsnr_timesteps(s, 20)
    keep = torch.tensor([True, True, False, False]).view(1, 1, 2, 2)
    x = torch.randn(400, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = inpaint(model, x, s, ts, a.expand_as(x), keep, generator=torch.Generator().manual_seed(1), resample=3)
    bottom_is_a = ((out[..., 1, :] - a[..., 1, :]).abs() < 0.05).all(-1).float().mean().item()
    assert bottom_is_a > 0.98, bottom_is_a
    plain = sample_ddim(model, x, s, ts, generator=torch.Generator().manual_seed(1), eta=1.0)
    assert 0.3 < ((plain - a).abs() < 0.05).flatten(1).all(1).float().mean().item() < 0.7, "the oracle is fair"


def test_slerp_ends_at_its_endpoints_and_stays_on_the_sphere():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 28, 28, generator=g), torch.randn(1, 28, 28, generator=g)
    b = b * a.norm() / b.norm()  # equal norms: the whole arc keeps that norm
    path = slerp(a, b, torch.linspace(0, 1, 7))
    assert path.shape == (7, 1, 28, 28)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(path.flatten(1).norm(dim=1), a.norm().expand(7), rtol=1e-5)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(e1, e2, torch.tensor([0.5]))[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))


# --- through python -m diffusion.sampling ---

def test_inpaint_command_keeps_the_top_half_and_generates_the_bottom(tiny_checkpoint, tmp_path):
    path, image = digit_png(tmp_path)
    out = tmp_path / "filled.png"
    res = run_cli("diffusion.sampling", "--checkpoint", str(tiny_checkpoint), "--inpaint", str(path), "--mask",
                  "bottom", "--num-images", "4", "--output", str(out))
    assert res.returncode == 0, res.stderr
    shown, cells = inpainting_cells(png_pixels(out), 4, 2)
    assert all(torch.equal(cell[:14], image[:14]) for cell in cells)
    assert len({cell[14:].numpy().tobytes() for cell in cells}) == 4
    assert torch.equal(shown[:14], image[:14]) and (shown[14:] == 128).all(), "each row starts with what was kept"


def test_inpaint_command_reads_a_mask_png_and_inverts_dark_on_light(tiny_checkpoint, tmp_path):
    path, image = digit_png(tmp_path)
    Image.fromarray(255 - image.numpy()).save(tmp_path / "paper.png")  # dark ink on white paper
    mask = torch.zeros(28, 28, dtype=torch.uint8)
    mask[:, 14:] = 255  # white = generate: the right half
    Image.fromarray(mask.numpy()).resize((280, 280), Image.NEAREST).save(tmp_path / "mask.png")  # any square side
    out = tmp_path / "filled.png"
    res = run_cli("diffusion.sampling", "--checkpoint", str(tiny_checkpoint), "--inpaint", str(tmp_path / "paper.png"),
                  "--mask", str(tmp_path / "mask.png"), "--num-images", "1", "--digit", "4", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "inverted" in res.stdout
    _, (cell,) = inpainting_cells(png_pixels(out), 1, 1)
    assert torch.equal(cell[:, :14], image[:, :14])


def test_interpolation_row_starts_and_ends_at_its_two_seeds(tiny_checkpoint, tmp_path):
    common = ["--checkpoint", str(tiny_checkpoint), "--digit", "2", *SAME_PRECISION]
    res = run_cli("diffusion.sampling", *common, "--interpolate", "9", "--num-images", "5", "--seed", "7",
                  "--output", str(tmp_path / "row.png"))
    assert res.returncode == 0, res.stderr
    cells = [c.float() for c in grid_cells(png_pixels(tmp_path / "row.png"), 5, 5)]
    for seed, cell in ((7, cells[0]), (9, cells[-1])):
        res = run_cli("diffusion.sampling", *common, "--eta", "0", "--num-images", "1", "--seed", str(seed),
                      "--output", str(tmp_path / f"s{seed}.png"))
        assert res.returncode == 0, res.stderr
        alone = png_pixels(tmp_path / f"s{seed}.png").float()
        assert (cell - alone).abs().mean() < 0.5, "an end of the row is that seed's own sample"
    assert (cells[0] - cells[-1]).abs().mean() > 5, "the two seeds differ"
    steps = [(a - b).abs().mean() for a, b in zip(cells, cells[1:])]
    assert max(steps) < (cells[0] - cells[-1]).abs().mean(), "neighbours are closer than the ends"


@pytest.mark.parametrize("flags,message", [
    (["--inpaint", "{missing}"], "cannot read the image"),
    (["--inpaint", "{digit}", "--mask", "middle"], "--mask must be a PNG file or one of"),
    (["--inpaint", "{digit}", "--interpolate"], "separate tasks"),
    (["--interpolate", "--eta", "1"], "deterministic sampler"),
    (["--inpaint", "{digit}", "--all-digits"], "not --all-digits"),
    (["--inpaint", "{wide}"], "must be square"),
])
def test_bad_editing_flags_are_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    path, _ = digit_png(tmp_path)
    Image.new("L", (40, 28)).save(tmp_path / "wide.png")
    names = {"missing": str(tmp_path / "nope.png"), "digit": str(path), "wide": str(tmp_path / "wide.png")}
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(tiny_checkpoint),
                        *[f.format(**names) for f in flags], "--output", str(tmp_path / "x.png"))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_inpaint_takes_a_test_digits_number(tiny_checkpoint, data_root, tmp_path):
    """--inpaint N completes MNIST test digit N: each row starts with it, and the kept top half comes back."""
    from diffusion.config import DataConfig
    from diffusion.dataloader import load_images

    out = tmp_path / "filled.png"
    res = run_cli("diffusion.sampling", "--checkpoint", str(tiny_checkpoint), "--inpaint", "3", "--data-root",
                  str(data_root), "--num-images", "4", "--output", str(out))
    assert res.returncode == 0, res.stderr
    images, labels = load_images(DataConfig(data_root=str(data_root)), train=False)
    image, label = images[3], int(labels[3])
    assert f"inpainting test digit 3 (a {label})" in res.stdout
    shown, cells = inpainting_cells(png_pixels(out), 4, 2)
    assert torch.equal(shown[:14], image[0, :14]) and all(torch.equal(c[:14], image[0, :14]) for c in cells)
    missing = run_cli("diffusion.sampling", "--checkpoint", str(tiny_checkpoint), "--inpaint", "99999", "--data-root",
                      str(data_root), "--output", str(tmp_path / "x.png"))
    assert missing.returncode == 2 and "there is no test digit 99999" in missing.stderr
