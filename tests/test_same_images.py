"""Every entry point draws the same images for the same settings and seed: the command line, the demo page's
server, evaluate's samples and the training preview all get their recipe from diffusion/recipe.py and their
noise from generation.generate. Each pair below breaks if one of them decides a setting on its own."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import demo as demo_command
from diffusion import evaluate as evaluate_command
from diffusion.checkpoint import load_network
from diffusion.cli import parse
from diffusion.config import RuntimeConfig, SampleConfig
from diffusion.metrics import split_grid
from tests.conftest import SAME_PRECISION, TINY, digit_png, run_cli, run_inprocess



@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Two 2-epoch runs with preview grids: one that learned the unconditional eps, one with --p-uncond 0."""
    folders = {}
    for name, extra in (("default", []), ("p_uncond_0", ["--p-uncond", "0"])):
        work = tmp_path_factory.mktemp(name)
        res = run_cli("diffusion.main", *TINY, *extra, *SAME_PRECISION, "--epochs", "2", "--sample-every", "1",
                      "--data-root", str(data_root), "--ckpt-dir", str(work / "ck"), "--out-dir", str(work / "out"))
        assert res.returncode == 0, res.stderr
        folders[name] = work
    return folders


def command_grid(capsys, tmp_path, checkpoint, *flags) -> tuple[torch.Tensor, np.ndarray, str]:
    """(the grid PNG's images, the --npy array, the printed line) of `python -m diffusion.sampling`."""
    png, npy = tmp_path / "cli.png", tmp_path / "cli.npy"
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(checkpoint), "--steps", "4", *flags,
                        *SAME_PRECISION, "--output", str(png), "--npy", str(npy))
    assert res.returncode == 0, res.stderr
    return split_grid(png), np.load(npy), res.stdout


def test_the_training_preview_is_the_commands_images(runs, capsys, tmp_path):
    for work in runs.values():
        preview = split_grid(work / "out" / "epoch_002.png")  # row k holds the k-th image of each digit
        images, _, line = command_grid(capsys, tmp_path, work / "ck" / "epoch_002.pth", "--all-digits",
                                       "--num-images", "2", "--seed", "1234", "--guide-checkpoint", "none")
        assert torch.equal(preview.view(2, 10, 1, 28, 28).transpose(0, 1).reshape(20, 1, 28, 28), images), line


CASES = {  # (run, the command's flags, the page's request; a guide is chosen when the demo starts)
    "autoguided digit": ("default", ["--digit", "3", "--seed", "5"], {"digit": 3, "seed": 5}),
    "classifier-free w 3": ("default", ["--guide-checkpoint", "none", "--guidance", "3", "--seed", "2"],
                            {"seed": 2, "guidance": 3}),
    "interpolation": ("default", ["--interpolate", "--num-images", "8", "--digit", "2", "--seed", "7"],
                      {"task": "interpolate", "digit": 2, "seed": 7}),
    "unlabelled interpolation": ("default", ["--interpolate", "9", "--num-images", "8", "--seed", "7"],
                                 {"task": "interpolate", "seed": 7, "end_seed": 9}),
    "inpainting": ("default", ["--inpaint", "DIGIT", "--mask", "right", "--seed", "4"],
                   {"task": "inpaint", "mask": "right", "seed": 4}),
    "--p-uncond 0": ("p_uncond_0", ["--seed", "3"], {"seed": 3}),
    "--p-uncond 0 interpolation": ("p_uncond_0", ["--interpolate", "--num-images", "8", "--digit", "6"],
                                   {"task": "interpolate", "digit": 6}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_command_and_the_demo_draw_the_same_images(runs, capsys, tmp_path, case):
    run, flags, request = CASES[case]
    checkpoint = runs[run] / "ck" / "epoch_002.pth"
    if "--inpaint" in flags:
        path, _ = digit_png(tmp_path)
        flags = [str(path) if f == "DIGIT" else f for f in flags]
        request["image"] = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        flags += ["--num-images", "16"]
    images, _, line = command_grid(capsys, tmp_path, checkpoint, *flags)
    started_with = [f for f in ("--guide-checkpoint", "none") if "none" in flags]
    _, configs = parse(demo_command.parser(), ["--checkpoint", str(checkpoint), *started_with, *SAME_PRECISION])
    page = demo_command.Demo(checkpoint, configs[SampleConfig], configs[RuntimeConfig])
    messages = []
    page.run({**request, "steps": 4}, messages.append)
    done = messages[-1]
    assert done["recipe"] in line, "the page and the command print the same recipe"
    page_png = tmp_path / "page.png"
    page_png.write_bytes(base64.b64decode(done["png"].split(",", 1)[1]))
    assert torch.equal(split_grid(page_png), images)


@pytest.mark.parametrize("run, flags", [("default", ["--seed", "11"]), ("default", ["--digit", "4", "--eta", "0.5"]),
                                        ("p_uncond_0", ["--seed", "11"])])
def test_evaluate_scores_the_images_the_command_draws(runs, capsys, tmp_path, run, flags):
    checkpoint = runs[run] / "ck" / "epoch_002.pth"
    _, npy, _ = command_grid(capsys, tmp_path, checkpoint, "--num-images", "24", *flags)
    args, configs = parse(evaluate_command.parser(), ["--checkpoint", str(checkpoint), "--n", "24", "--steps", "4",
                                                      *flags, *SAME_PRECISION])
    loaded = load_network(checkpoint)
    drawn = evaluate_command.draw(loaded, args, configs[SampleConfig], configs[RuntimeConfig])
    assert np.array_equal(drawn.squeeze(1).numpy(), npy)


def test_a_request_that_differs_draws_different_images(runs, capsys, tmp_path):
    """The comparisons above can fail: one step of the seed changes the page's grid."""
    checkpoint = runs["default"] / "ck" / "epoch_002.pth"
    images, _, _ = command_grid(capsys, tmp_path, checkpoint, "--seed", "5")
    _, configs = parse(demo_command.parser(), ["--checkpoint", str(checkpoint), *SAME_PRECISION])
    messages = []
    demo_command.Demo(checkpoint, configs[SampleConfig], configs[RuntimeConfig]).run({"seed": 6, "steps": 4},
                                                                                    messages.append)
    page = torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(messages[-1]["png"].split(",")[1])))
                                     .convert("L")))
    assert page.shape[0] == 2 + 4 * 30 and not torch.equal(page, torch.from_numpy(np.array(
        Image.open(tmp_path / "cli.png").convert("L"))))
