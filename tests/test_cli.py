"""End to end through the real commands, on a tiny model and a small subset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.checkpoint import load_checkpoint
from tests.conftest import TINY, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A tiny two-epoch run, shared by the tests below."""
    work = tmp_path_factory.mktemp("run")
    res = run_cli("diffusion.main", *TINY, "--epochs", "2", "--data-root", str(data_root),
                  "--ckpt-dir", str(work / "ck"), "--out-dir", str(work / "out"))
    assert res.returncode == 0, res.stderr
    return work, res


def test_training_prints_mean_loss_and_checkpoints_every_epoch(trained):
    work, res = trained
    assert res.stdout.count("mean loss") == 2
    assert sorted(p.name for p in (work / "ck").glob("*.pth")) == ["epoch_001.pth", "epoch_002.pth"]
    assert (work / "ck" / "latest").read_text().strip() == "epoch_002.pth"
    state = load_checkpoint(work / "ck" / "epoch_002.pth")
    assert {"model", "ema", "optimizer", "epoch", "step", "model_config", "train_config"} <= state.keys()
    assert state["epoch"] == 2 and state["step"] == 8 and state["format"] == 7
    assert state["model_config"]["base_channels"] == 8 and state["model_config"]["num_classes"] == 10
    assert state["model_config"]["learned_unconditional"] is True


def test_training_writes_pictures_and_metrics(trained):
    out = trained[0] / "out"
    assert (out / "epoch_001.png").exists() and (out / "epoch_002.png").exists() and (out / "loss_curve.png").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["images_per_s"] > 0 for r in records)


def test_sampling_writes_grid_and_npy(trained, tmp_path):
    work, _ = trained
    res = run_cli("diffusion.sampling", "--ckpt-dir", str(work / "ck"), "--output", str(tmp_path / "g.png"),
                  "--npy", str(tmp_path / "g.npy"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "g.png").size == (4 * 30 + 2, 4 * 30 + 2)  # 4x4 cells of 28 + 2 padding
    arr = np.load(tmp_path / "g.npy")
    assert arr.shape == (16, 28, 28) and arr.dtype == np.uint8


def test_sampling_same_seed_same_images_and_digit_rows(trained, tmp_path):
    work, _ = trained
    a = run_cli("diffusion.sampling", "--ckpt-dir", str(work / "ck"), "--npy", str(tmp_path / "a.npy"),
                "--output", str(tmp_path / "a.png"), "--digit", "7", "--sampler", "ddim", "--steps", "3")
    b = run_cli("diffusion.sampling", "--ckpt-dir", str(work / "ck"), "--npy", str(tmp_path / "b.npy"),
                "--output", str(tmp_path / "b.png"), "--digit", "7", "--sampler", "ddim", "--steps", "3")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    rows = run_cli("diffusion.sampling", "--ckpt-dir", str(work / "ck"), "--all-digits", "--num-images", "3",
                   "--output", str(tmp_path / "rows.png"), "--gif", str(tmp_path / "r.gif"), "--gif-x0")
    assert rows.returncode == 0, rows.stderr
    assert Image.open(tmp_path / "rows.png").size == (3 * 30 + 2, 10 * 30 + 2)
    gif = Image.open(tmp_path / "r.gif")
    assert gif.n_frames > 2 and gif.size == (2 * (3 * 30 + 2), 10 * 30 + 2)


def test_sampling_with_ddpm_all_steps(trained, tmp_path):
    res = run_cli("diffusion.sampling", "--ckpt-dir", str(trained[0] / "ck"), "--sampler", "ddpm",
                  "--num-images", "4", "--output", str(tmp_path / "d.png"))
    assert res.returncode == 0 and "ddpm" in res.stdout, res.stderr


def test_resume_continues_to_more_epochs(trained, tmp_path, data_root):
    work, _ = trained
    res = run_cli("diffusion.main", *TINY, "--epochs", "3", "--data-root", str(data_root), "--resume",
                  str(work / "ck" / "epoch_002.pth"), "--ckpt-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout and res.stdout.count("mean loss") == 1
    assert load_checkpoint(tmp_path / "epoch_003.pth")["step"] == 12


def help_entries(module: str) -> dict[str, str]:
    """--flag -> its help text, from `python -m module --help`."""
    import re

    res = run_cli(module, "--help")
    assert res.returncode == 0 and f"python -m {module}" in res.stdout
    body = res.stdout.split("\n\n", 2)[-1]  # past the usage and description
    entries = re.findall(r"^  (--[\w-]+)[^\n]*?(?:  +|\n +)(.*?)(?=^  -|^\S|\Z)", body, re.M | re.S)
    return {flag: " ".join(text.split()) for flag, text in entries}


def test_help_gives_every_flag_a_sentence_and_the_real_default():
    from diffusion.config import PARTS, fields_of, flag_name, show

    entries = help_entries("diffusion.main")
    for part, f in fields_of(*PARTS):
        flag = flag_name(f.name)
        assert flag in entries, f"{flag} is missing from --help"
        assert len(entries[flag].split()) >= 4, f"{flag} has no help sentence: {entries[flag]!r}"
        if f.name != "data_root":
            assert entries[flag].endswith(f"(default: {show(getattr(part(), f.name))})"), (flag, entries[flag])
    assert "--resume" in entries and "--debug" in entries


@pytest.mark.parametrize("module,takes", [
    ("diffusion.sampling", {"SampleConfig", "RuntimeConfig", "data_root"}),  # --inpaint N: a test digit
    ("diffusion.evaluate", {"SampleConfig", "RuntimeConfig", "data_root", "download"}),
    ("diffusion.demo", {"SampleConfig", "device", "threads", "amp", "memory_format", "seed", "ckpt_dir", "data_root"}),
    ("diffusion.export", {"ckpt_dir"}),
    ("diffusion.classifier", {"data_root", "download", "limit_train", "epochs"}),  # its own --epochs
])
def test_each_command_shows_the_flags_of_the_parts_it_takes_and_one_debug(module, takes):
    from diffusion.config import PARTS, fields_of, flag_name

    entries = help_entries(module)
    for part, f in fields_of(*PARTS):
        assert (flag_name(f.name) in entries) == (part.__name__ in takes or f.name in takes), (module, f.name)
    assert "--debug" in entries and all(len(text.split()) >= 2 for text in entries.values()), entries


def test_a_checkpoint_holds_no_sampling_or_runtime_setting(trained):
    from diffusion.config import PARTS, RuntimeConfig, SampleConfig, fields_of

    state = load_checkpoint(trained[0] / "ck" / "epoch_002.pth")
    stored = {k for part in ("model_config", "train_config", "data_config") for k in state[part]} | set(state)
    assert not stored & {f.name for _, f in fields_of(SampleConfig, RuntimeConfig)}, "sampling or runtime field saved"
    assert "config" not in state and len(PARTS) == 5


def test_tensorboard_logger_records_loss_and_preview(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_cli("diffusion.main", *TINY, "--epochs", "2", "--logger", "tensorboard", "--data-root", str(data_root),
                  "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"images": 0}).Reload()
    curve = load_checkpoint(tmp_path / "ck" / "epoch_002.pth")["curve"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in curve]
    assert [v for _, v in logged] == pytest.approx([v for _, v in curve], rel=1e-6)
    assert [e.step for e in events.Scalars("epoch/mean_loss")] == [4, 8]
    assert len(events.Images("preview")) == 2


def test_sampling_guides_with_the_earlier_epoch_by_default(trained, tmp_path):
    """--guide-checkpoint auto: epoch_002.pth is guided by epoch_001.pth (autoguidance); with none, or from the
    first epoch (nothing earlier), sampling falls back to classifier-free guidance and says so."""
    ck = trained[0] / "ck"
    runs = {name: run_cli("diffusion.sampling", "--ckpt-dir", str(ck), "--num-images", "4", *flags,
                          "--output", str(tmp_path / f"{name}.png"), "--npy", str(tmp_path / f"{name}.npy"))
            for name, flags in [("auto", []), ("none", ["--guide-checkpoint", "none"]),
                                ("first", ["--checkpoint", str(ck / "epoch_001.pth")])]}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    assert ":3, autoguidance by epoch_001.pth, w 2.5)" in runs["auto"].stdout
    assert ":1, classifier-free guidance, w 2)" in runs["none"].stdout  # the settings that suit it
    assert "no earlier epoch" in runs["first"].stdout
    assert not np.array_equal(np.load(tmp_path / "auto.npy"), np.load(tmp_path / "none.npy"))


def test_exported_pair_reproduces_the_autoguided_default(trained, tmp_path):
    """An exported folder holds one network; exporting the earlier epoch too and naming it with --guide-checkpoint
    gives exactly the images that the checkpoint folder's default (auto) guide gives."""
    ck = trained[0] / "ck"
    for epoch in (1, 2):
        res = run_cli("diffusion.export", str(tmp_path / f"e{epoch}"), "--checkpoint", str(ck / f"epoch_00{epoch}.pth"))
        assert res.returncode == 0, res.stderr
    pair = run_cli("diffusion.sampling", "--checkpoint", str(tmp_path / "e2"), "--guide-checkpoint", str(tmp_path / "e1"),
                   "--num-images", "4", "--output", str(tmp_path / "pair.png"), "--npy", str(tmp_path / "pair.npy"))
    auto = run_cli("diffusion.sampling", "--ckpt-dir", str(ck), "--num-images", "4",
                   "--output", str(tmp_path / "auto.png"), "--npy", str(tmp_path / "auto.npy"))
    assert pair.returncode == 0 and auto.returncode == 0, pair.stderr + auto.stderr
    assert "autoguidance by e1" in pair.stdout
    assert np.array_equal(np.load(tmp_path / "pair.npy"), np.load(tmp_path / "auto.npy"))


def test_a_smaller_network_guides_through_the_command(trained, tmp_path, data_root):
    """--guide-checkpoint takes a network of another width and depth on the same diffusion (Karras et al. 2024's
    smaller guide): its images differ from the run's own guide's; one of another diffusion is one error line."""
    ck = trained[0] / "ck"
    for name, flags in (("small", ["--channel-mults", "1"]), ("other", ["--channel-mults", "1", "--timesteps", "40"])):
        res = run_cli("diffusion.main", *TINY, *flags, "--epochs", "1", "--sample-every", "0", "--data-root",
                      str(data_root), "--ckpt-dir", str(tmp_path / name), "--out-dir", str(tmp_path / "out"))
        assert res.returncode == 0, res.stderr
    runs = {name: run_cli("diffusion.sampling", "--ckpt-dir", str(ck), "--num-images", "4", *flags,
                          "--output", str(tmp_path / f"{name}.png"), "--npy", str(tmp_path / f"{name}.npy"))
            for name, flags in (("own", []), ("small", ["--guide-checkpoint", str(tmp_path / "small" / "epoch_001.pth")]))}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr for r in runs.values()]
    assert "autoguidance by epoch_001.pth, w 2.5" in runs["small"].stdout
    assert not np.array_equal(np.load(tmp_path / "own.npy"), np.load(tmp_path / "small.npy"))
    other = run_cli("diffusion.sampling", "--ckpt-dir", str(ck), "--guide-checkpoint",
                    str(tmp_path / "other" / "epoch_001.pth"), "--output", str(tmp_path / "o.png"))
    assert other.returncode == 2 and "cannot guide this network: it was trained with timesteps 40" in other.stderr
    assert "Traceback" not in other.stderr


def test_the_papers_ddpm_is_one_command_that_says_what_it_is(trained, tmp_path):
    ck = str(trained[0] / "ck")
    paper = run_cli("diffusion.sampling", "--ckpt-dir", ck, "--paper", "--num-images", "4",
                    "--output", str(tmp_path / "p.png"), "--npy", str(tmp_path / "p.npy"))
    spelled = run_cli("diffusion.sampling", "--ckpt-dir", ck, "--sampler", "ddpm", "--unconditional",
                      "--guide-checkpoint", "none", "--num-images", "4", "--output", str(tmp_path / "s.png"),
                      "--npy", str(tmp_path / "s.npy"))
    assert paper.returncode == 0 and spelled.returncode == 0, paper.stderr + spelled.stderr
    assert "(ddpm-50, no guidance, no labels)" in paper.stdout
    assert np.array_equal(np.load(tmp_path / "p.npy"), np.load(tmp_path / "s.npy"))
    clash = run_cli("diffusion.sampling", "--ckpt-dir", ck, "--paper", "--sampler", "ddim")
    assert clash.returncode == 2 and "--paper" in clash.stderr and "Traceback" not in clash.stderr


def test_paper_sets_the_papers_ddpm_and_flags_beside_it_win():
    from diffusion.config import PAPER
    from diffusion.main import parse_run
    _, cfg = parse_run(["--paper"])
    assert {k: getattr(cfg.model if hasattr(cfg.model, k) else cfg.train, k) for k in PAPER} == PAPER
    assert (cfg.model.num_classes, cfg.model.schedule, cfg.model.prediction, cfg.model.patch_size,
            cfg.train.noise_levels) == (0, "linear", "eps", 1, "uniform")
    assert (cfg.model.base_channels, cfg.train.epochs) == (32, 2), "--paper keeps the run this project first trained"
    _, cfg = parse_run(["--paper", "--base-channels", "16", "--noise-levels", "lognormal"])
    assert (cfg.model.base_channels, cfg.model.patch_size, cfg.train.noise_levels) == (16, 1, "lognormal")
    _, plain = parse_run([])
    assert (plain.model.patch_size, plain.model.num_classes, plain.model.schedule) == (2, 10, "cosine")
    assert (plain.model.base_channels, plain.model.channel_mults, plain.train.epochs) == (32, (1, 1), 5)
    assert not plain.train.stratified_t and not cfg.train.stratified_t, "t as Algorithm 1 draws it"


@pytest.mark.parametrize("levels,share", [("uniform", 0.0), ("lognormal", 1.0), ("mixed", 0.5)])
def test_noise_levels_draw_that_share_of_the_steps_log_normal(levels, share):
    """The steps' mass above sigma = 2 (where a digit's shape is decided) is the uniform share's plus the log-normal
    share's: (1 - w) P_uniform(sigma > 2) + w P_lognormal(sigma > 2)."""
    from diffusion.config import LOGNORMAL_SIGMA
    from diffusion.diffusion_utils import lognormal_t_probs, schedule_from_config
    from diffusion.main import parse_run
    from diffusion.train import training_t_probs
    _, cfg = parse_run(["--noise-levels", levels])
    s = schedule_from_config(cfg.model, torch.float64)
    noisy = ((1 - s.alpha_bar) / s.alpha_bar).sqrt() > 2
    probs = training_t_probs(cfg)
    probs = torch.full((s.T,), 1 / s.T) if probs is None else probs
    expected = (1 - share) * noisy.double().mean() + share * lognormal_t_probs(s, *LOGNORMAL_SIGMA)[noisy].sum()
    assert probs.sum().item() == pytest.approx(1, abs=1e-5)
    assert probs[noisy].sum().item() == pytest.approx(expected.item(), abs=1e-4)
