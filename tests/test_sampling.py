"""The sampling recipe (diffusion/recipe.py), the labels, and generate applying a recipe exactly."""
import math

import pytest
import torch

from diffusion.checkpoint import check_can_guide, epoch_name
from diffusion.config import ModelConfig, SampleConfig
from diffusion.errors import UserError
from diffusion.generation import generate, sample_labels
from diffusion.recipe import choose_recipe
from diffusion.runtime import Precision, Runtime

CPU = Runtime(torch.device("cpu"), Precision(False, False))
LABELLED, NO_UNCOND = ModelConfig(), ModelConfig(learned_unconditional=False)


def test_default_labels_cover_every_class_equally_in_random_order():
    labels = sample_labels(LABELLED, 20, seed=1)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 2))
    assert not torch.equal(labels, torch.arange(20) % 10)
    assert torch.equal(labels, sample_labels(LABELLED, 20, seed=1))


def test_a_smaller_network_can_guide_but_not_one_of_another_diffusion():
    smaller = ModelConfig(base_channels=16, channel_mults=(1,), attention_resolutions=(14,), prediction="v")
    check_can_guide(smaller, LABELLED, "guide.pth")  # another width, depth and output: still the same eps
    linear = ModelConfig(schedule="linear")
    for other, guided, needle in ((ModelConfig(timesteps=500), LABELLED, "timesteps 500"),
                                  (linear, LABELLED, "schedule"), (linear.replace(beta_end=0.03), linear, "beta end"),
                                  (ModelConfig(num_classes=0), LABELLED, "num classes 0")):
        with pytest.raises(UserError, match=needle):
            check_can_guide(other, guided, "guide.pth")
    check_can_guide(NO_UNCOND, LABELLED, "guide.pth")  # with labels it is only asked for labelled eps
    with pytest.raises(UserError, match="without labels: it was trained with --p-uncond 0"):
        check_can_guide(NO_UNCOND, LABELLED, "guide.pth", labelled=False)


def test_digit_rows_and_unconditional():
    assert torch.equal(sample_labels(LABELLED, 5, digit=7), torch.full((5,), 7))
    assert torch.equal(sample_labels(LABELLED, 2, all_digits=True), torch.arange(10).repeat_interleave(2))
    assert sample_labels(LABELLED, 16, unconditional=True) is None
    assert sample_labels(ModelConfig(num_classes=0), 16) is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"digit": 10}, "--digit must be in 0..9"), ({"digit": -1}, "--digit must be in 0..9"),
    ({"digit": 3, "unconditional": True}, "--unconditional excludes"),
])
def test_label_errors(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        sample_labels(LABELLED, 4, **kwargs)


def test_digit_needs_a_conditional_model():
    with pytest.raises(UserError, match="trained without labels"):
        sample_labels(ModelConfig(num_classes=0), 4, digit=3)


@pytest.fixture
def run_folder(tmp_path):
    """epoch_001..003 and epoch_006 on disk (the recipe only looks for files)."""
    for epoch in (1, 2, 3, 6):
        (tmp_path / epoch_name(epoch)).write_bytes(b"")
    return tmp_path


INF = math.inf
# task, labelled, guide setting, epoch, model, typed flags -> sampler, steps, eta, w, interval, guide file, words
TABLE = [
    ("sample", True, "auto", 2, LABELLED, {}, ("dpmpp", 10, 3.0, 2.5, (0.4, 5.0), "epoch_001.pth", "autoguidance")),
    ("sample", True, "auto", 5, LABELLED, {}, ("dpmpp", 10, 3.0, 2.5, (0.4, 5.0), "epoch_002.pth", "autoguidance")),
    ("sample", True, "auto", 6, LABELLED, {}, ("dpmpp", 10, 3.0, 2.5, (0.4, 5.0), "epoch_003.pth", "autoguidance")),
    ("sample", True, "auto", 1, LABELLED, {}, ("dpmpp", 10, 1.0, 2.0, (0.15, 2.0), None, "no earlier epoch")),
    ("sample", True, "none", 2, LABELLED, {}, ("dpmpp", 10, 1.0, 2.0, (0.15, 2.0), None, "classifier-free")),
    ("sample", False, "auto", 2, LABELLED, {}, ("dpmpp", 20, 1.0, 2.0, (0.0, INF), "epoch_001.pth", "no labels")),
    ("sample", False, "none", 2, LABELLED, {}, ("dpmpp", 20, 1.0, 1.0, (0.0, INF), None, "no guidance")),
    ("sample", True, "auto", 2, LABELLED, {"guidance": 3.0, "eta": 0.5, "sample_steps": 7},
     ("dpmpp", 7, 0.5, 3.0, (0.4, 5.0), "epoch_001.pth", "w 3")),
    ("sample", True, "auto", 2, LABELLED, {"guidance": 1.0}, ("dpmpp", 10, 3.0, 1.0, (0.4, 5.0), None, "conditional model")),
    ("sample", True, "auto", 2, LABELLED, {"sampler": "ddim"}, ("ddim", 10, 1.0, 2.5, (0.4, 5.0), "epoch_001.pth", "ddim-10:1")),
    ("sample", True, "none", 2, LABELLED, {"sampler": "ddpm"}, ("ddpm", 1000, 1.0, 2.0, (0.15, 2.0), None, "ddpm-1000,")),
    ("sample", True, "auto", 2, LABELLED, {"guidance_interval": (0.0, INF)},
     ("dpmpp", 10, 3.0, 2.5, (0.0, INF), "epoch_001.pth", "autoguidance")),
    ("inpaint", True, "auto", 2, LABELLED, {}, ("dpmpp", 10, 1.0, 2.5, (0.4, 5.0), "epoch_001.pth", "RePaint")),
    ("inpaint", False, "auto", 2, LABELLED, {"resample": 2}, ("dpmpp", 20, 1.0, 2.0, (0.0, INF), "epoch_001.pth", "resample 2")),
    ("interpolate", True, "auto", 2, LABELLED, {}, ("dpmpp", 10, 0.0, 2.5, (0.4, 5.0), "epoch_001.pth", ":0,")),
    ("interpolate", False, "none", 2, LABELLED, {}, ("dpmpp", 20, 0.0, 1.0, (0.0, INF), None, "no labels")),
    ("preview", True, "auto", 2, LABELLED, {}, ("dpmpp", 10, 1.0, 2.0, (0.15, 2.0), None, "preview has no earlier")),
    ("preview", True, "auto", 2, LABELLED, {"guidance": 3.0}, ("dpmpp", 10, 1.0, 3.0, (0.15, 2.0), None, "w 3")),
    ("preview", True, "auto", 2, NO_UNCOND, {}, ("dpmpp", 10, 1.0, 1.0, (0.0, INF), None, "--p-uncond 0")),
    ("sample", True, "none", 2, NO_UNCOND, {}, ("dpmpp", 10, 1.0, 1.0, (0.0, INF), None, "conditional model")),
    ("sample", True, "auto", 2, NO_UNCOND, {}, ("dpmpp", 10, 3.0, 2.5, (0.4, 5.0), "epoch_001.pth", "autoguidance")),
    ("sample", True, "auto", 2, ModelConfig(timesteps=8), {}, ("dpmpp", 8, 3.0, 2.5, (0.4, 5.0), "epoch_001.pth", "-8:3")),
]


@pytest.mark.parametrize("task,labelled,guide,epoch,model,typed,want", TABLE)
def test_one_function_decides_every_setting(run_folder, task, labelled, guide, epoch, model, typed, want):
    asked = SampleConfig(guide_checkpoint=guide, **typed)
    r = choose_recipe(model, asked, task=task, labelled=labelled, checkpoint=run_folder / epoch_name(epoch), epoch=epoch)
    sampler, steps, eta, w, interval, guide_file, words = want
    assert (r.sampler, r.steps, r.eta, r.guidance, r.interval) == (sampler, steps, eta, w, interval)
    assert (r.guide.name if r.guide else None) == guide_file
    assert words in str(r), str(r)


@pytest.mark.parametrize("task,labelled,model,typed,needle", [
    ("interpolate", True, LABELLED, {"eta": 1.0}, "deterministic sampler"),
    ("sample", True, LABELLED, {"sampler": "ddim", "eta": 3.0}, "at most 1"),
    ("inpaint", True, LABELLED, {"eta": 2.0}, "inpainting takes eta"),
    ("sample", True, LABELLED, {"resample": 2}, "--resample is for inpainting"),
    ("sample", True, LABELLED, {"sample_steps": 2000}, "exceeds the 1000 timesteps"),
    ("sample", True, LABELLED, {"sampler": "ddpm", "sample_steps": 10}, "ddpm runs all"),
    ("sample", False, NO_UNCOND, {}, "no unconditional mode"),
    ("sample", True, NO_UNCOND, {"guidance": 2.0, "guide_checkpoint": "none"}, "pass --guidance 1"),
    ("preview", True, NO_UNCOND, {"guidance": 2.0}, "pass --guidance 1"),
    ("sample", True, LABELLED, {"guide_checkpoint": "/no/such.pth"}, "does not exist"),
])
def test_the_recipe_refuses_what_would_run_but_do_the_wrong_thing(run_folder, task, labelled, model, typed, needle):
    with pytest.raises(UserError, match=needle):
        choose_recipe(model, SampleConfig(**typed), task=task, labelled=labelled,
                      checkpoint=run_folder / epoch_name(2), epoch=2)


def test_an_exported_folder_has_no_earlier_epoch_to_autoguide_with(tmp_path):
    r = choose_recipe(LABELLED, SampleConfig(), task="sample", labelled=True, checkpoint=tmp_path, epoch=None)
    assert r.guide is None and (r.eta, r.guidance) == (1.0, 2.0) and "classifier-free" in str(r)


class Spy(torch.nn.Module):
    """Predicts no noise and records the labels of every pass."""

    def __init__(self, calls=None):
        super().__init__()
        self.calls = [] if calls is None else calls

    def forward(self, x, t, y):
        self.calls.append(y.tolist())
        return torch.zeros_like(x)


@pytest.mark.parametrize("typed,labelled,passes", [({}, True, 10), ({}, False, 20), ({"sample_steps": 7}, False, 7)])
def test_generate_runs_the_recipes_steps(typed, labelled, passes):
    """Auto steps: 10 with labels, 20 without; a typed --steps wins. w = 1: one pass per step."""
    recipe = choose_recipe(LABELLED, SampleConfig(guidance=1.0, **typed), task="sample", labelled=labelled)
    spy = Spy()
    generate(spy, LABELLED, recipe, 4, torch.arange(4) if labelled else None, CPU, progress=False)
    assert len(spy.calls) == passes


@pytest.mark.parametrize("labelled", [True, False])
def test_generate_asks_the_weak_network_at_the_guided_steps_only(run_folder, labelled):
    """Autoguided with labels: the weak network at the 5 guided steps of 10, with the labels; without labels
    (every noise level, 20 steps) at all 20, with the null label."""
    recipe = choose_recipe(LABELLED, SampleConfig(), task="sample", labelled=labelled,
                           checkpoint=run_folder / epoch_name(2), epoch=2)
    net, weak = Spy(), Spy()
    generate(net, LABELLED, recipe, 4, torch.arange(4) if labelled else None, CPU, progress=False, weak=weak)
    assert weak.calls == ([[0, 1, 2, 3]] * 5 if labelled else [[10] * 4] * 20)
    assert len(net.calls) == (10 if labelled else 20)


def test_sampling_precision_is_timed_at_the_plain_batch(monkeypatch, tmp_path):
    """Guidance doubles the batch only inside its noise interval (2 of the default 10 steps), so the precision is
    timed at the batch most steps run, and at most the recipe's batch."""
    import diffusion.autotune as autotune
    from diffusion.checkpoint import Loaded
    from diffusion.config import RuntimeConfig
    from diffusion.generation import prepare
    timed = []
    monkeypatch.setattr(autotune, "choose_precision", lambda cfg, model_cfg, device, net, purpose, batch, verbose:
                        timed.append(batch) or Precision(False, False))
    loaded = Loaded(Spy(), LABELLED, tmp_path / "epoch_002.pth", 2)
    prepare(loaded, SampleConfig(), RuntimeConfig(), task="sample", labelled=True, n=16)
    prepare(loaded, SampleConfig(sample_batch=8), RuntimeConfig(), task="sample", labelled=True, n=16)
    assert timed == [16, 8]
