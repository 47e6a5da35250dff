"""Which labels `python -m diffusion.sampling` guides with."""
import math

import pytest
import torch

from diffusion.config import Config
from diffusion.errors import UserError
from diffusion.generation import sample_labels


def test_default_labels_cover_every_class_equally_in_random_order():
    labels = sample_labels(Config(), 20, seed=1)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 2))
    assert not torch.equal(labels, torch.arange(20) % 10)
    assert torch.equal(labels, sample_labels(Config(), 20, seed=1))


def test_digit_rows_and_unconditional():
    assert torch.equal(sample_labels(Config(), 5, digit=7), torch.full((5,), 7))
    assert torch.equal(sample_labels(Config(), 2, all_digits=True), torch.arange(10).repeat_interleave(2))
    assert sample_labels(Config(), 16, unconditional=True) is None
    assert sample_labels(Config(num_classes=0), 16) is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"digit": 10}, "--digit must be in 0..9"), ({"digit": -1}, "--digit must be in 0..9"),
    ({"digit": 3, "unconditional": True}, "--unconditional excludes"),
])
def test_label_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        sample_labels(Config(), 4, **kwargs)


def test_digit_needs_a_conditional_model():
    with pytest.raises(UserError, match="trained without labels"):
        sample_labels(Config(num_classes=0), 4, digit=3)


@pytest.mark.parametrize("steps, labelled, passes", [(0, True, 10), (0, False, 20), (7, False, 7), (7, True, 7)])
def test_auto_steps_give_the_unconditional_model_twice_the_steps(steps, labelled, passes):
    """--steps 0 (auto, the default): 10 solver steps with labels, 20 without; an explicit --steps always wins."""
    from diffusion.config import Config
    from diffusion.generation import generate
    calls = []

    class Spy(torch.nn.Module):  # counts network passes; predicts no noise
        def forward(self, x, t, y):
            calls.append(len(x))
            return torch.zeros_like(x)

    # w = 1: one pass per step, labelled or not; fixed precision, so no timing of the spy reaches the cache
    cfg = Config(sample_steps=steps, guidance=1.0, amp="none", memory_format="contiguous")
    generate(Spy(), cfg, 4, torch.arange(4) if labelled else None, torch.device("cpu"), progress=False)
    assert len(calls) == passes


def test_sampling_precision_is_timed_at_the_plain_batch(monkeypatch):
    """Guidance doubles the batch only inside its noise interval (2 of the default 10 steps), so the precision is
    timed at the batch most steps run: a choice made for the doubled batch ran 23% slower at 64 on one Xeon."""
    import diffusion.generation as generation
    from diffusion.autotune import Precision
    from diffusion.config import Config
    timed = []
    monkeypatch.setattr(generation, "choose_precision",
                        lambda cfg, device, net, purpose, batch, verbose: timed.append(batch) or Precision(False, False))

    class Zero(torch.nn.Module):
        def forward(self, x, t, y):
            return torch.zeros_like(x)

    generation.generate(Zero(), Config(), 16, torch.arange(16) % 10, torch.device("cpu"), progress=False)
    assert timed == [16]


@pytest.mark.parametrize("labelled", [True, False])
def test_generate_asks_the_weak_network_at_the_guided_steps_only(labelled):
    """With a weak network (autoguidance) the default sampler asks it at the 2 guided steps of 10, with the labels;
    without labels (settings_for_guide: every noise level, 20 steps) at all 20, with the null label."""
    from diffusion.generation import generate
    calls = {"net": [], "weak": []}

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x, t, y):
            calls[self.name].append(y.tolist())
            return torch.zeros_like(x)

    from diffusion.generation import settings_for_guide
    labels = torch.arange(4) if labelled else None
    cfg = settings_for_guide(Config(amp="none", memory_format="contiguous"), {}, autoguided=True, labelled=labelled)
    generate(Spy("net"), cfg, 4, labels, torch.device("cpu"), progress=False, weak=Spy("weak"))
    assert calls["weak"] == ([[0, 1, 2, 3]] * 2 if labelled else [[10] * 4] * 20)
    assert len(calls["net"]) == (10 if labelled else 20)


def fake_checkpoint(path, epoch: int) -> None:
    torch.save({"model": {}, "ema": {}, "config": Config().to_dict(), "epoch": epoch, "step": 100 * epoch,
                "format": 2}, path)


def test_auto_guide_is_the_epoch_at_half_the_training(tmp_path):
    from diffusion.generation import guide_path
    for epoch in (1, 2, 3, 6):
        fake_checkpoint(tmp_path / f"epoch_{epoch:03d}.pth", epoch)
    fake_checkpoint(tmp_path / "final.pth", 6)  # a --minutes run stopped in epoch 7
    assert guide_path(tmp_path / "epoch_002.pth", "auto") == tmp_path / "epoch_001.pth"
    assert guide_path(tmp_path / "epoch_003.pth", "auto") == tmp_path / "epoch_001.pth"
    assert guide_path(tmp_path / "final.pth", "auto") == tmp_path / "epoch_003.pth"
    assert guide_path(tmp_path / "epoch_001.pth", "auto") is None  # nothing earlier
    (tmp_path / "epoch_003.pth").unlink()  # --keep-last removed it: classifier-free guidance
    assert guide_path(tmp_path / "epoch_006.pth", "auto") is None
    assert guide_path(tmp_path / "epoch_006.pth", "none") is None
    assert guide_path(tmp_path / "epoch_006.pth", str(tmp_path / "epoch_002.pth")) == tmp_path / "epoch_002.pth"


def test_settings_suit_the_guide_unless_the_command_line_set_them():
    """eta 3 and w 2.5 are for autoguidance; classifier-free guidance and unguided sampling get eta 1 and w 2, which
    scored better with them; flags given on the command line always win."""
    from diffusion.generation import settings_for_guide
    cfg = Config()
    assert (cfg.eta, cfg.guidance) == (3.0, 2.5)
    assert settings_for_guide(cfg, {}, autoguided=True) == cfg
    cfg_only = settings_for_guide(cfg, {}, autoguided=False)
    assert (cfg_only.eta, cfg_only.guidance) == (1.0, 2.0)
    mine = settings_for_guide(Config(eta=2.0), {"eta": 2.0}, autoguided=False)
    assert (mine.eta, mine.guidance) == (2.0, 2.0)
    unlabelled = settings_for_guide(cfg, {}, autoguided=True, labelled=False)  # autoguided at every noise level
    assert (unlabelled.eta, unlabelled.guidance, unlabelled.guidance_interval) == (1.0, 2.0, (0.0, math.inf))


@pytest.mark.parametrize("kwargs, want", [({}, (1.0, 2.0)), ({"eta": 0.5}, (0.5, 2.0)), ({"guidance": 3.0}, (1.0, 3.0))])
def test_training_preview_uses_classifier_free_settings_unless_the_run_set_them(monkeypatch, kwargs, want):
    """The per-epoch preview has no earlier network to autoguide with: eta 1 and w 2 unless the run chose others."""
    import diffusion.train as train
    seen = []
    monkeypatch.setattr(train, "generate", lambda net, cfg, *a, **k: seen.append((cfg.eta, cfg.guidance)))
    train.preview_samples(None, Config(**kwargs), torch.device("cpu"))
    assert seen == [want]
