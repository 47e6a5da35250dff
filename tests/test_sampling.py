"""Which labels `python -m diffusion.sampling` guides with."""
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
