"""The scorecard: it must rank real digits far above broken ones, at equal N."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion.classifier import DigitCNN, accuracy, train_classifier
from diffusion.config import Config
from diffusion.dataloader import load_images, to_unit_range
from diffusion.evaluate import frechet_distance, precision_recall, scorecard, split_grid
from diffusion.visuals import save_grid


@pytest.fixture(scope="module")
def classifier(data_root, tmp_path_factory):
    """A classifier trained in seconds on a small subset (the full one is not trained in CI)."""
    path = tmp_path_factory.mktemp("clf") / "cnn.pth"
    acc = train_classifier(Config(data_root=str(data_root), limit_train=3000, batch_size=128), 3, path)
    assert acc > 0.8
    from diffusion.classifier import load_classifier
    return load_classifier(path)


@pytest.fixture(scope="module")
def sets(data_root):
    cfg = Config(data_root=str(data_root))
    train, _ = load_images(cfg, train=True)
    test, _ = load_images(cfg, train=False)
    g = torch.Generator().manual_seed(0)
    n = 400
    real = train[torch.randperm(len(train), generator=g)[:n]]
    noise = torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8)
    blurred = ((F.avg_pool2d(to_unit_range(real), 5, 1, 2) + 1) * 127.5).round().to(torch.uint8)
    collapsed = real[:1].repeat(n, 1, 1, 1)
    return {"reference": test[:n], "train": train, "real": real, "noise": noise, "blurred": blurred, "collapsed": collapsed}


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20_000, 3, generator=g, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4I) in 3-D: |mu|^2 = 3, trace term = 3 * (1 + 4 - 2 * 2) = 3
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_extremes():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 4, generator=g)
    assert precision_recall(real, real + 100)[0] == 0.0
    p, r = precision_recall(real, torch.randn(500, 4, generator=g))
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(real, real[:1].repeat(500, 1) + 1e-3)  # collapsed: precise, no recall
    assert p == 1.0 and r < 0.05


def test_scorecard_ranks_real_far_above_broken_sets(classifier, sets):
    cards = {k: scorecard(classifier, sets[k], sets["reference"], sets["train"])
             for k in ("real", "noise", "blurred", "collapsed")}
    for bad in ("noise", "blurred", "collapsed"):
        assert cards[bad]["fd"] > 3 * cards["real"]["fd"], (bad, cards[bad]["fd"], cards["real"]["fd"])
    assert cards["collapsed"]["recall"] < 0.1 < cards["real"]["recall"]
    assert cards["collapsed"]["class_kl_uniform"] > 1.5 > cards["real"]["class_kl_uniform"] + 1.0
    # precision alone can miss noise (its features may fall inside a wide real k-NN ball); recall cannot
    assert cards["noise"]["recall"] < 0.1 < cards["real"]["recall"]
    assert cards["noise"]["confidence"] < cards["real"]["confidence"]
    assert cards["real"]["nn_train_distance_median"] < 0.02  # in the training set (cdist rounding aside)


def test_grid_split_recovers_images(tmp_path, sets):
    images = sets["real"][:16]
    save_grid(to_unit_range(images), tmp_path / "g.png", nrow=4)
    back = split_grid(tmp_path / "g.png")
    assert back.shape == (16, 1, 28, 28)
    assert (back.int() - images.int()).abs().max() <= 1


def test_classifier_accuracy_function(classifier, data_root):
    test, labels = load_images(Config(data_root=str(data_root)), train=False)
    assert accuracy(classifier, test[:500], labels[:500]) > 0.8
    assert DigitCNN().embed(torch.zeros(2, 1, 28, 28)).shape == (2, 128)
