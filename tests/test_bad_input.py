"""Every class of bad input: one line on stderr, exit code 2, no traceback, nothing lost."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from diffusion.checkpoint import load_checkpoint, save_checkpoint
from diffusion.errors import UserError
from tests.conftest import TINY, assert_clean_error, make_fake_mnist, run_cli, run_inprocess


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, data_root):
    work = tmp_path_factory.mktemp("bad")
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--sample-every", "0", "--data-root", str(data_root),
                  "--ckpt-dir", str(work), "--out-dir", str(work / "out"))
    assert res.returncode == 0, res.stderr
    return work / "epoch_001.pth"


def test_missing_data_names_path_and_files(tmp_path):
    res = run_cli("diffusion.main", "--data-root", str(tmp_path / "nowhere"), "--no-download")
    assert_clean_error(res, str(tmp_path / "nowhere" / "MNIST" / "raw"))
    assert "train-images-idx3-ubyte" in res.stderr and "DIFFUSION_DATA_ROOT" in res.stderr


def test_missing_data_from_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", str(tmp_path / "env-root"))
    assert_clean_error(run_inprocess(capsys, "diffusion.main", "--no-download"), str(tmp_path / "env-root"))


def test_unreadable_data(tmp_path, capsys):
    root = make_fake_mnist(tmp_path)
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    assert_clean_error(run_inprocess(capsys, "diffusion.main", "--data-root", str(root), "--no-download"), "unreadable")


@pytest.mark.parametrize("flags,needle", [
    (["--epochs", "0"], "--epochs must be >= 1"), (["--batch-size", "-4"], "--batch-size"),
    (["--timesteps", "0"], "--timesteps"), (["--lr", "-1"], "--lr"), (["--base-channels", "12"], "multiple of 8"),
    (["--image-size", "30"], "must divide by 4"), (["--schedule", "sigmoid"], "--schedule"),
    (["--sampler", "heun"], "--sampler"), (["--device", "quantum"], "--device"),
])
def test_nonsense_config_on_command_line(flags, needle, capsys):
    assert_clean_error(run_inprocess(capsys, "diffusion.main", *flags), needle)


def test_nonsense_config_in_a_real_process():
    assert_clean_error(run_cli("diffusion.main", "--epochs", "-1", process=True), "--epochs must be >= 1")


def test_unknown_flag_is_usage_error():
    res = run_cli("diffusion.main", "--epohcs", "3")
    assert res.returncode == 2 and "unrecognized arguments: --epohcs" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--digit", "10"], "--digit must be in 0..9"), (["--digit", "-1"], "--digit must be in 0..9"),
    (["--guidance", "-2"], "--guidance must be >= 0"), (["--steps", "-1"], "--sample-steps must be >= 1"),
    (["--num-images", "0"], "--num-images must be in 1.."),
    # what the network was trained for comes from the checkpoint, noise schedule included
    (["--base-channels", "16"], "--base-channels is fixed by training"), (["--image-size", "32"], "fixed by training"),
    (["--channel-mults", "1", "2", "2"], "fixed by training"), (["--timesteps", "1000"], "--timesteps is fixed by training"),
    (["--schedule", "cosine"], "--schedule is fixed by training"), (["--beta-end=0.03"], "--beta-end is fixed"),
    (["--lr", "1e-3"], "--lr is a training setting"), (["--no-compile"], "--no-compile is a training setting"),
    (["--steps", "51"], "exceeds the 50 timesteps"), (["--sample-batch", "0"], "--sample-batch must be >= 1"),
    (["--guidance-interval", "5", "1"], "0 <= LO < HI"), (["--guidance-interval", "1"], "two noise levels"),
    (["--guidance-interval", "1", "x"], "'x' is not a number"), (["--resample", "0"], "--resample must be >= 1"),
    (["--min-snr-gamma", "5"], "--min-snr-gamma is a training setting"),
    (["--guide-checkpoint", "no/such.pth"], "no/such.pth does not exist"),
])
def test_bad_sampling_flags(ckpt, tmp_path, flags, needle, capsys):
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x.png"), *flags)
    assert_clean_error(res, needle)
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output(ckpt, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(ckpt), "--output", str(blocker / "g.png"))
    assert_clean_error(res, "cannot")


def test_no_checkpoint_yet(tmp_path, capsys):
    assert_clean_error(run_inprocess(capsys, "diffusion.sampling", "--ckpt-dir", str(tmp_path)), "no checkpoint in")


@pytest.mark.parametrize("kind,needle", [
    ("missing", "does not exist"), ("truncated", "not a readable checkpoint"), ("random", "not a readable checkpoint"),
    ("empty", "not a readable checkpoint"), ("foreign", "not a checkpoint of this project"),
])
def test_bad_checkpoint_files(ckpt, tmp_path, kind, needle, capsys):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        path.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    args = ("--checkpoint", str(path), "--output", str(tmp_path / "o.png"))
    assert_clean_error(run_inprocess(capsys, "diffusion.sampling", *args), needle)
    if kind == "truncated":  # and once through a real process
        assert_clean_error(run_cli("diffusion.sampling", *args, process=True), needle)


@pytest.mark.parametrize("flags,needle", [
    (["--base-channels", "16"], "--base-channels 8"), (["--timesteps", "100"], "--timesteps 50"),
    (["--schedule", "linear"], "--schedule cosine"),
])
def test_resume_with_another_architecture_or_noise_schedule_is_refused(ckpt, tmp_path, data_root, capsys, flags, needle):
    res = run_inprocess(capsys, "diffusion.main", *TINY, *flags, "--data-root", str(data_root),
                        "--resume", str(ckpt), "--ckpt-dir", str(tmp_path))
    assert_clean_error(res, needle)
    assert not list(tmp_path.glob("*.pth"))


@pytest.mark.parametrize("flags,needle", [
    (["--schedule", "linear", "--timesteps", "20"], "too few for the linear schedule"),
    (["--schedule", "linear", "--timesteps", "10"], "too few"),
    (["--schedule", "linear", "--beta-end", "0.004"], "alpha_bar_T"),
    (["--beta-end", "0.03"], "add --schedule linear"), (["--beta-start", "2e-4"], "add --schedule linear"),
    (["--save-every", "5"], "--save-every"),
    (["--save-every=-3min"], "--save-every"), (["--save-every", "tomorrow"], "--save-every"),
])
def test_settings_that_would_train_the_wrong_thing(flags, needle, capsys):
    assert_clean_error(run_inprocess(capsys, "diffusion.main", *flags), needle)


@pytest.fixture(scope="module")
def ckpt_without_null_label(tmp_path_factory, data_root):
    work = tmp_path_factory.mktemp("p0")
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--p-uncond", "0", "--data-root", str(data_root),
                  "--ckpt-dir", str(work), "--out-dir", str(work / "out"))
    assert res.returncode == 0, res.stderr  # its per-epoch preview had to fall back to guidance 1
    assert (work / "out" / "epoch_001.png").exists()
    return work / "epoch_001.pth"


@pytest.mark.parametrize("flags,needle", [(["--guidance", "3"], "pass --guidance 1"),
                                          (["--guide-checkpoint", "none", "--guidance", "2"], "pass --guidance 1"),
                                          (["--unconditional"], "drop --unconditional")])
def test_guidance_needs_a_trained_unconditional_model(ckpt_without_null_label, tmp_path, flags, needle, capsys):
    args = ("--checkpoint", str(ckpt_without_null_label), "--output", str(tmp_path / "g.png"))
    assert_clean_error(run_inprocess(capsys, "diffusion.sampling", *args, *flags), needle)
    assert run_inprocess(capsys, "diffusion.sampling", *args, "--guidance", "1", "--num-images", "2").returncode == 0
    plain = run_inprocess(capsys, "diffusion.sampling", *args, "--num-images", "2")  # the same answer as the preview
    assert plain.returncode == 0 and "the conditional model, no guidance (trained with --p-uncond 0)" in plain.stdout


def test_scoring_too_few_images_is_one_line(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "three.npy", np.zeros((3, 28, 28), dtype=np.uint8))
    res = run_inprocess(capsys, "diffusion.evaluate", "--samples", str(tmp_path / "three.npy"),
                        "--classifier", str(tmp_path / "none.pth"))
    assert_clean_error(res, "at least 4 images")


class MakesAFile:
    """Unpickling this creates a file: what a malicious .pth would do."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_loading_never_executes_code_from_a_file(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "ema": {}, "config": {}, "epoch": 0, "step": 0, "payload": MakesAFile(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(evil)
    res = run_cli("diffusion.sampling", "--checkpoint", str(evil), "--output", str(tmp_path / "o.png"))
    assert_clean_error(res, "refusing to load")
    assert not marker.exists(), "loading ran code from the file"
    pickle.loads(pickle.dumps(MakesAFile(marker)))  # the payload is real: plain pickle does create the file
    assert marker.exists()


def test_full_disk_keeps_old_checkpoint(ckpt, tmp_path, monkeypatch):
    path = tmp_path / "epoch_001.pth"
    path.write_bytes(ckpt.read_bytes())
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        save_checkpoint({"model": {}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_001.pth"], "no temporary file may be left behind"


@pytest.mark.parametrize("labels, needle", [(lambda y: y[:-5], "labels for 2048 images"),
                                             (lambda y: torch.cat([y[:-1], torch.tensor([200], dtype=torch.uint8)]),
                                              "a label outside 0..9 (200)")])
def test_data_files_that_disagree_are_refused_before_training(tmp_path, capsys, labels, needle):
    from tests.conftest import write_idx

    root = make_fake_mnist(tmp_path / "data")
    raw = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    original = torch.frombuffer(bytearray(raw.read_bytes()[8:]), dtype=torch.uint8)
    write_idx(raw, labels(original))
    res = run_inprocess(capsys, "diffusion.main", *TINY, "--data-root", str(root), "--no-download",
                        "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out"))
    assert_clean_error(res, needle)
    assert str(raw) in res.stderr and not (tmp_path / "ck" / "epoch_001.pth").exists()


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")  # what a full disk's write() raises


@pytest.mark.parametrize("writer, flags", [("diffusion.sampling.save_grid", []),
                                           ("numpy.save", ["--npy", "samples.npy"]),
                                           ("diffusion.visuals.Animation.save", ["--gif", "steps.gif"])])
def test_a_full_disk_while_writing_samples_is_one_line(ckpt, tmp_path, monkeypatch, capsys, writer, flags):
    monkeypatch.setattr(writer, no_space)
    flags = [str(tmp_path / f) if f.endswith((".npy", ".gif")) else f for f in flags]
    res = run_inprocess(capsys, "diffusion.sampling", "--checkpoint", str(ckpt), "--output", str(tmp_path / "x.png"),
                        *flags)
    assert_clean_error(res, "No space left on device", after_progress=True)


def test_a_full_disk_after_the_checkpoint_keeps_it_and_says_so(tmp_path, data_root, monkeypatch, capsys):
    monkeypatch.setattr("diffusion.train.save_loss_curve", no_space)
    res = run_inprocess(capsys, "diffusion.main", *TINY, "--epochs", "2", "--sample-every", "0", "--data-root",
                        str(data_root), "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out"))
    assert_clean_error(res, "epoch_001.pth is saved", after_progress=True)
    assert load_checkpoint(tmp_path / "ck" / "epoch_001.pth")["epoch"] == 1
    assert (tmp_path / "ck" / "latest").read_text().strip() == "epoch_001.pth"


def test_no_room_for_a_checkpoint_is_refused_before_the_first_step(tmp_path, data_root, monkeypatch, capsys):
    import shutil

    full = shutil.disk_usage(tmp_path)._replace(free=10_000)
    monkeypatch.setattr("diffusion.checkpoint.shutil.disk_usage", lambda path: full)
    monkeypatch.setattr("diffusion.train.train_one_epoch", lambda *a: pytest.fail("a training step ran"))
    res = run_inprocess(capsys, "diffusion.main", *TINY, "--epochs", "1", "--data-root", str(data_root),
                        "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out"))
    assert_clean_error(res, "MB free; a checkpoint of this model needs about")


def test_tensorboard_logger_without_tensorboard_is_one_line(tmp_path, data_root):
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; sys.modules['torch.utils.tensorboard'] = None\n"  # as if tensorboard were not installed
            "from diffusion.main import main\nfrom diffusion.cli import run_cli\nrun_cli(main)")
    res = subprocess.run([sys.executable, "-c", code, *TINY, "--logger", "tensorboard", "--data-root", str(data_root),
                          "--ckpt-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_clean_error(res, "pip install")
