"""Checkpoints written by earlier versions still load and draw exactly the images those versions drew: format 2 (one
flat config of every setting) and format 3 (model settings apart, before --patch-size: every pixel seen alone). The
test takes each version's code from the repository's history, trains a tiny model with it and samples with it, then
samples the same checkpoint with this code on the old code's grid of sampling steps (a sampling setting, which
checkpoints do not hold)."""
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import load_checkpoint, load_network
from tests.conftest import ROOT, SAME_PRECISION, digit_png, grid_cells, inpainting_cells, png_pixels, run_inprocess

OLD = {2: "5ed95f0", 3: "5a02011"}  # the last commit that wrote each format
SAME = [*SAME_PRECISION, "--num-images", "4"]
TASKS = {"sample": [], "interpolate": ["--interpolate", "--digit", "7"],
         "inpaint": ["--inpaint", "DIGIT", "--guide-checkpoint", "none"],
         "uncond": ["--unconditional", "--sampler", "ddim", "--steps", "5", "--guide-checkpoint", "CKPT"]}


def flags(task: str, ckpt: Path, digit: Path) -> list[str]:
    return [str(digit) if f == "DIGIT" else str(ckpt) if f == "CKPT" else f for f in TASKS[task]]


@pytest.fixture(scope="module", params=sorted(OLD), ids=lambda f: f"format{f}")
def old_run(request, tmp_path_factory, data_root):
    """(checkpoint, the folder with the PNGs the old code drew from it, the test digit, its format)."""
    fmt = request.param
    work = tmp_path_factory.mktemp(f"format{fmt}")
    archive = work / "old.tar"
    got = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), OLD[fmt], "diffusion"],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"commit {OLD[fmt]} is not in this checkout's history ({got.stderr.strip()[:80]})")
    with tarfile.open(archive) as tar:
        tar.extractall(work / "code", filter="data")
    digit, _ = digit_png(work)

    ckpt = work / "ck" / "epoch_001.pth"
    calls = [("diffusion.main", ["--base-channels", "8", "--channel-mults", "1", "--timesteps", "50", "--limit-train",
                                 "128", "--batch-size", "64", "--warmup-steps", "2", "--epochs", "1", "--sample-every", "0",
                                 "--data-root", str(data_root), "--ckpt-dir", str(work / "ck"), "--out-dir", str(work),
                                 "--amp", "none", "--memory-format", "contiguous"])]
    calls += [("diffusion.sampling", ["--checkpoint", str(ckpt), *SAME, *flags(task, ckpt, digit),
                                      "--output", str(work / f"{task}.png")]) for task in TASKS]
    script = "import importlib\n" + "".join(f"importlib.import_module({m!r}).main({a!r})\n" for m, a in calls)
    res = subprocess.run([sys.executable, "-c", script], cwd=work / "code", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]  # one process: the old code is imported once
    return ckpt, work, digit, fmt


def test_the_old_code_wrote_its_format(old_run):
    state, fmt = load_checkpoint(old_run[0]), old_run[3]
    assert state["format"] == fmt
    if fmt == 2:
        assert "config" in state and "model_config" not in state
        assert "sample_steps" in state["config"], "format 2 stored the run's sampling settings too"
    else:
        assert "patch_size" not in state["model_config"], "format 3 came before --patch-size"


def test_an_old_checkpoint_loads_with_what_training_fixed(old_run):
    loaded = load_network(old_run[0])
    assert (loaded.config.base_channels, loaded.config.channel_mults, loaded.config.timesteps) == (8, (1,), 50)
    assert loaded.config.patch_size == 1, "before --patch-size, the network saw every pixel"
    assert loaded.config.schedule == "linear", "trained when linear was the default, and it says so"
    assert loaded.config.learned_unconditional and loaded.epoch == 1


@pytest.mark.parametrize("field,then", [("schedule", "linear"), ("attention_heads", 4), ("level_skips", True)])
def test_a_saved_model_without_a_field_had_the_value_of_its_time(field, then):
    from diffusion.checkpoint import model_config
    from diffusion.config import ModelConfig
    saved = ModelConfig(attention_heads=2, level_skips=False, schedule="cosine")
    values = {k: v for k, v in saved.to_dict().items() if k != field}
    assert model_config({"model_config": values}, "old.pth").to_dict()[field] == then
    assert model_config({"config": values}, "old.pth").to_dict()[field] == then  # format 2's flat dict


@pytest.mark.parametrize("level_skips", [True, False])
def test_a_saved_model_without_the_stem_skip_had_it_with_the_level_skips(level_skips):
    """Before --stem-skip, the stem's skip came and went with --level-skips; before both, it was there."""
    from diffusion.checkpoint import model_config
    from diffusion.config import ModelConfig
    values = ModelConfig(level_skips=level_skips).to_dict()
    del values["stem_skip"]
    assert model_config({"model_config": values}, "old.pth").stem_skip == level_skips
    del values["level_skips"]
    assert model_config({"model_config": values}, "old.pth").stem_skip is True


def old_grid(work: Path):
    """The old code's sampler_timesteps, from its own samplers.py."""
    spec = importlib.util.spec_from_file_location(f"old_samplers_{work.name}", work / "code" / "diffusion" / "samplers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sampler_timesteps


@pytest.mark.parametrize("task", TASKS)
def test_an_old_checkpoint_draws_the_images_the_old_code_drew(old_run, tmp_path, capsys, monkeypatch, task):
    ckpt, work, digit, fmt = old_run
    monkeypatch.setattr("diffusion.generation.sampler_timesteps", old_grid(work))
    out = tmp_path / f"{task}.png"
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(ckpt), *SAME, *flags(task, ckpt, digit),
                        "--output", str(out))
    assert res.returncode == 0, res.stderr
    if task == "inpaint" and fmt == 2:  # format 3's code led each row with what was kept; the completions are the same
        _, new = inpainting_cells(png_pixels(out), 4, 2)
        assert all(map(torch.equal, new, grid_cells(png_pixels(work / "inpaint.png"), 4, 2)))
    else:
        assert torch.equal(png_pixels(out), png_pixels(work / f"{task}.png"))
