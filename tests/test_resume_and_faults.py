"""Exact resume, signals, SIGKILL at any moment, and non-finite losses."""
import math
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import diffusion.train as train_module
from diffusion.checkpoint import find_latest, load_checkpoint, resolve_checkpoint
from diffusion.errors import UserError
from diffusion.train import train
from tests.conftest import ROOT, TINY, each_in_its_part, parse_args, run_cli


def tiny_cfg(data_root, ckpt_dir, *extra):
    return parse_args([*TINY, "--data-root", str(data_root), "--ckpt-dir", str(ckpt_dir),
                       "--out-dir", str(ckpt_dir / "out"), "--sample-every", "0", *extra])


def assert_same_weights(a: dict, b: dict) -> None:
    pairs = [(key, a[key], b[key]) for key in ("model", "ema")]
    pairs += [(f"ema_tracks.{s}", a["ema_tracks"][s], b["ema_tracks"][s]) for s in a["ema_tracks"]]
    assert a["ema_tracks"].keys() == b["ema_tracks"].keys()
    for key, x, y in pairs:
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), f"{key}.{name} differs"


def test_few_steps_on_a_fixed_batch_lower_its_loss(data_root, tmp_path):
    run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path, "--lr", "3e-3", "--epochs", "10"))  # LR decays over 40 steps
    x0, y = run.images[:64].float() / 127.5 - 1, run.labels[:64]
    g = torch.Generator().manual_seed(0)
    fixed_t, fixed_eps = torch.randint(0, 50, (64,), generator=g), torch.randn(x0.shape, generator=g)

    def fixed_loss():
        from diffusion.diffusion_utils import q_sample
        with torch.no_grad():
            return ((run.model(q_sample(x0, fixed_t, fixed_eps, run.schedule), fixed_t, y) - fixed_eps) ** 2).mean().item()

    before = fixed_loss()
    for _ in range(30):
        run.train_step(x0, y)
    assert fixed_loss() < 0.7 * before


def test_resume_after_epoch_is_bit_identical(data_root, tmp_path):
    """The weights, their EMA and every EMA track kept for choosing after training."""
    flags = ("--epochs", "2", "--ema-lengths", "0.05", "0.2")
    full = train(tiny_cfg(data_root, tmp_path / "a", *flags))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "epoch_001.pth").write_bytes((tmp_path / "a" / "epoch_001.pth").read_bytes())
    train(tiny_cfg(data_root, tmp_path / "b", *flags), resume="latest")
    end = load_checkpoint(tmp_path / "a" / "epoch_002.pth")
    assert_same_weights(end, load_checkpoint(tmp_path / "b" / "epoch_002.pth"))
    assert full.step == 8 and set(end["ema_tracks"]) == {"0.05", "0.2"}
    name = "out.2.weight"
    assert not torch.equal(end["ema_tracks"]["0.05"][name], end["ema_tracks"]["0.2"][name])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train_module.diffusion_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", poisoned)
    with pytest.raises(UserError, match=r"non-finite at step 6 \(epoch 2\).*epoch_001.pth"):
        train(tiny_cfg(data_root, tmp_path, "--epochs", "3"))
    assert resolve_checkpoint(None, tmp_path).name == "epoch_001.pth"
    assert load_checkpoint(tmp_path / "epoch_001.pth")["step"] == 4


def start_training(data_root, ckpt_dir, *extra, prelude: str = ""):
    """Training in a child process, optionally after `prelude` Python code (fault injection)."""
    code = f"{prelude}\nfrom diffusion.main import main\nfrom diffusion.cli import run_cli\nrun_cli(main)"
    args = [*TINY, "--data-root", str(data_root), "--ckpt-dir", str(ckpt_dir), "--out-dir", str(ckpt_dir / "out"),
            "--sample-every", "0", *extra]
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


SIGNAL_RUN = ("--epochs", "3", "--limit-train", "1024")


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    res = run_cli("diffusion.main", *TINY, *SIGNAL_RUN, "--data-root", str(data_root), "--ckpt-dir", str(ref),
                  "--out-dir", str(ref / "out"), "--sample-every", "0")
    assert res.returncode == 0, res.stderr
    return load_checkpoint(ref / "epoch_003.pth")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_state_and_resume_matches_uninterrupted_run(data_root, tmp_path, sig, uninterrupted):
    flags = SIGNAL_RUN
    proc = start_training(data_root, tmp_path / "run", *flags)
    wait_for(tmp_path / "run" / "epoch_001.pth", proc)
    time.sleep(0.3)  # land somewhere inside epoch 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in out and "--resume" in out and "Traceback" not in err
    state = load_checkpoint(resolve_checkpoint(None, tmp_path / "run"))
    assert state["step"] > 4
    res = run_cli("diffusion.main", *TINY, *flags, "--data-root", str(data_root), "--ckpt-dir", str(tmp_path / "run"),
                  "--out-dir", str(tmp_path / "run" / "out"), "--sample-every", "0", "--resume")
    assert res.returncode == 0, res.stderr
    assert_same_weights(uninterrupted, load_checkpoint(tmp_path / "run" / "epoch_003.pth"))


# os.replace is the commit point of every checkpoint write: kill the process just before the Nth one
KILL_AT_REPLACE = """
import os, signal
_real, _count = os.replace, [0]
def _replace(src, dst):
    _count[0] += str(dst).endswith((".pth", "latest"))
    if _count[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is written and synced, not yet renamed
    return _real(src, dst)
os.replace = _replace
"""


@pytest.mark.parametrize("n", [1, 2, 3])
def test_sigkill_during_checkpoint_write_loses_nothing(data_root, tmp_path, n):
    """Replace #1 writes epoch 1, #2 its `latest` pointer, #3 epoch 2 (#4, its pointer, is the case of #2 again)."""
    proc = start_training(data_root, tmp_path, "--epochs", "3", prelude=KILL_AT_REPLACE.format(n=n))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    for ckpt in tmp_path.glob("epoch_*.pth"):
        load_checkpoint(ckpt)  # every finished checkpoint is whole
    finished = sorted(p.name for p in tmp_path.glob("epoch_*.pth"))
    assert len(finished) == n // 2
    assert len(list(tmp_path.glob(".*.tmp"))) == 1, "the killed write leaves only its temporary file"
    if finished:  # `latest` moves only after its checkpoint is whole, so it may still name the one before
        assert load_checkpoint(resolve_checkpoint(None, tmp_path))["epoch"] == 1
    res = run_cli("diffusion.main", *TINY, "--epochs", "3", "--data-root", str(data_root), "--ckpt-dir", str(tmp_path),
                  "--out-dir", str(tmp_path / "out"), "--sample-every", "0", *(["--resume"] if finished else []))
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(resolve_checkpoint(None, tmp_path))["epoch"] == 3


def wait_for_new_save(ckpt_dir, proc, after: float, timeout=120):
    """Wait until `latest` is rewritten after time `after` (a save committed), or the run ends."""
    end = time.time() + timeout
    pointer = ckpt_dir / "latest"
    while not (pointer.exists() and pointer.stat().st_mtime > after) and proc.poll() is None:
        assert time.time() < end, "no checkpoint was saved"
        time.sleep(0.02)


def test_sigkill_at_random_moments_then_the_same_command_finishes_the_run(data_root, tmp_path, uninterrupted):
    """A job script that always passes --resume: killed before its first save, then right after random
    saves; every restart loses at most --save-every steps and the end result is bit-identical."""
    rng = random.Random(0)
    flags = (*SIGNAL_RUN, "--save-every", "3steps", "--resume")
    proc = start_training(data_root, tmp_path, *flags)
    time.sleep(0.5)  # still importing: nothing saved yet
    proc.kill()
    proc.communicate()
    assert find_latest(tmp_path) is None
    for _ in range(3):
        started = time.time()
        proc = start_training(data_root, tmp_path, *flags)
        wait_for_new_save(tmp_path, proc, started)
        time.sleep(rng.uniform(0, 0.4))
        proc.kill()
        out, _ = proc.communicate()
        state = load_checkpoint(find_latest(tmp_path))  # whole, and at most 3 steps behind the kill
        assert state["step"] > 0
        assert len(list(tmp_path.glob("step_*.pth"))) <= 1, "older timed checkpoints are superseded"
    res = run_cli("diffusion.main", *TINY, *flags, "--data-root", str(data_root), "--ckpt-dir", str(tmp_path),
                  "--out-dir", str(tmp_path / "out"), "--sample-every", "0")
    assert res.returncode == 0, res.stderr
    assert_same_weights(uninterrupted, load_checkpoint(tmp_path / "epoch_003.pth"))
    assert not list(tmp_path.glob("step_*.pth")), "the final epoch checkpoint supersedes the timed ones"


def test_resume_with_nothing_saved_starts_fresh(data_root, tmp_path, capsys):
    train(tiny_cfg(data_root, tmp_path, "--epochs", "1"), resume="latest")
    assert "nothing to resume" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "epoch_001.pth")["step"] == 4


def test_time_based_checkpoints_are_written(data_root, tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 61))  # every call to the clock is a minute and a second later
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    saved = []
    real_save = train_module.TrainingRun.save
    monkeypatch.setattr(train_module.TrainingRun, "save", lambda run, name: saved.append(name) or real_save(run, name))
    train(tiny_cfg(data_root, tmp_path, "--epochs", "1", "--save-every", "1min"))
    assert saved == ["step_00000001.pth", "step_00000002.pth", "step_00000003.pth", "epoch_001.pth"]
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["epoch_001.pth"]


def test_non_finite_weights_are_never_saved(data_root, tmp_path):
    run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path))
    run.save("epoch_001.pth")
    with torch.no_grad():
        next(run.ema.module.parameters())[0] = float("nan")
    with pytest.raises(UserError, match="non-finite.*epoch_001.pth"):
        run.save("interrupted.pth")
    assert resolve_checkpoint(None, tmp_path).name == "epoch_001.pth" and not (tmp_path / "interrupted.pth").exists()


def test_grad_clip_zero_means_no_clipping(data_root, tmp_path):
    def weights_after_steps(clip):
        run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path, "--grad-clip", clip))
        x0, y = run.images[:64].float() / 127.5 - 1, run.labels[:64]
        for _ in range(3):
            run.train_step(x0, y)
        return [p.detach().clone() for p in run.model.parameters()]

    unclipped, off, start = weights_after_steps("1e9"), weights_after_steps("0"), train_module.TrainingRun(
        tiny_cfg(data_root, tmp_path)).model.parameters()
    assert all(torch.equal(a, b) for a, b in zip(unclipped, off))
    assert any(not torch.equal(a, b) for a, b in zip(off, start)), "the weights must move"


def test_min_snr_gamma_weighs_the_training_loss(data_root, tmp_path):
    """The same first step (same t, same noise, same weights) with and without Min-SNR: the weighted loss is
    the plain one with each image's error scaled by min(SNR_t, gamma) / SNR_t <= 1, so it must be smaller."""
    def first_loss(*flags):
        run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path, *flags))
        return run.train_step(run.images[:64].float() / 127.5 - 1, run.labels[:64]).item()

    plain, weighted = first_loss(), first_loss("--min-snr-gamma", "1")
    assert weighted < 0.9 * plain


@pytest.mark.parametrize("flags,stratified", [(("--stratified-t",), True), ((), False)])
def test_a_training_step_draws_the_batchs_t_as_configured(data_root, tmp_path, flags, stratified):
    """With --stratified-t the i-th of the batch's n images gets its t from the i-th of n equal parts of 0..T-1; by
    default each t is drawn on its own (Algorithm 1), which lands them all in their parts almost never."""
    run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path, *flags))
    seen, network = {}, run.model.network

    def spy(x, t, y):
        seen["t"] = t
        return network(x, t, y)
    run.model.network = spy
    run.train_step(run.images[:64].float() / 127.5 - 1, run.labels[:64])
    assert bool(each_in_its_part(seen["t"], run.schedule.T).all()) == stratified


def test_v_prediction_trains_the_network_on_minus_v_with_unit_weight(data_root, tmp_path):
    """A spy on the U-Net's own output F: from what it was given (c_in x_t = x_t for v, and t) and the clean batch,
    the noise and v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 follow (Salimans & Ho 2022); the step's loss must
    be the plain mean of (F + v)^2, not the eps loss the samplers read back."""
    run = train_module.TrainingRun(tiny_cfg(data_root, tmp_path, "--prediction", "v", "--p-uncond", "0"))
    seen, network = {}, run.model.network

    def spy(x, t, y):
        seen.update(xt=x.float(), t=t, out=network(x, t, y).float())
        return seen["out"]
    run.model.network = spy
    x0 = run.images[:64].float() / 127.5 - 1
    loss = run.train_step(x0, run.labels[:64]).item()
    ab = run.schedule.alpha_bar[seen["t"]].view(-1, 1, 1, 1)
    eps = (seen["xt"] - ab.sqrt() * x0) / (1 - ab).sqrt()
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert loss == pytest.approx((seen["out"] + v).square().mean().item(), rel=1e-4)


def test_keep_last_prunes_old_epoch_checkpoints(data_root, tmp_path):
    train(tiny_cfg(data_root, tmp_path, "--epochs", "4", "--keep-last", "2"))
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["epoch_003.pth", "epoch_004.pth"]
    assert resolve_checkpoint(None, tmp_path).name == "epoch_004.pth"


class StepClock:
    """A fake time.monotonic that advances only when a training step runs: half a second per step."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        real_step = train_module.TrainingRun.train_step

        def timed_step(run, x0, y):
            self.now += 0.5
            return real_step(run, x0, y)
        monkeypatch.setattr(train_module.TrainingRun, "train_step", timed_step)
        monkeypatch.setattr(train_module.time, "monotonic", lambda: self.now)


def test_minutes_budget_ends_training_with_the_learning_rate_at_zero(data_root, tmp_path, monkeypatch):
    StepClock(monkeypatch)
    run = train(tiny_cfg(data_root, tmp_path, "--minutes", "0.05", "--warmup-steps", "1"))  # 3 s = 6 steps
    assert run.step == 6 and run.trained_seconds == pytest.approx(3.0)
    # the last step ran at 2.5 s of the 3 s budget: a cosine in training time, zero once it is spent
    peak = run.cfg.train.lr
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 2.5 / 3)))
    assert run.lr_scheduler.lr_lambdas[0](run.step) == pytest.approx(0.0, abs=1e-12)
    assert resolve_checkpoint(None, tmp_path).name == "final.pth" and (tmp_path / "epoch_001.pth").exists()
    state = load_checkpoint(tmp_path / "final.pth")
    assert state["step"] == 6 and state["batch_in_epoch"] == 2 and state["trained_seconds"] == pytest.approx(3.0)


def test_a_resumed_budgeted_run_continues_the_same_schedule(data_root, tmp_path, monkeypatch):
    StepClock(monkeypatch)
    flags = ("--minutes", "0.1", "--warmup-steps", "2", "--save-every", "5steps")  # 6 s = 12 steps
    full = train(tiny_cfg(data_root, tmp_path / "a", *flags))
    assert full.step == 12
    # interrupt the second run after its 5-step snapshot: its budget, LR and data position come back from it
    real_save = train_module.TrainingRun.save

    def save_then_die(run, name):
        path = real_save(run, name)
        if name.startswith("step_"):
            raise KeyboardInterrupt
        return path
    monkeypatch.setattr(train_module.TrainingRun, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(data_root, tmp_path / "b", *flags))
    monkeypatch.setattr(train_module.TrainingRun, "save", real_save)
    resumed = train(tiny_cfg(data_root, tmp_path / "b", *flags), resume="latest")
    assert resumed.step == 12 and resumed.trained_seconds == pytest.approx(full.trained_seconds)
    assert_same_weights(load_checkpoint(tmp_path / "a" / "final.pth"), load_checkpoint(tmp_path / "b" / "final.pth"))
