"""The scorecard: it must rank real digits far above broken ones, at equal N."""
import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.config import DataConfig
from diffusion.dataloader import load_images, to_unit_range
from diffusion.errors import UserError
from diffusion.digit_classifier import DigitCNN, accuracy, load_classifier, train_classifier
from diffusion.metrics import (frechet_distance, frechet_distance_gaussians, memorisation, precision_recall, scorecard,
                                split_grid)
from diffusion.visuals import save_grid


@pytest.fixture(scope="module")
def classifier(data_root, tmp_path_factory):
    """A classifier trained in seconds on a small subset (the full one is not trained in CI)."""
    path = tmp_path_factory.mktemp("clf") / "cnn.pth"
    acc = train_classifier(DataConfig(data_root=str(data_root), limit_train=3000), 3, path)
    assert acc > 0.8
    return load_classifier(path)


@pytest.fixture(scope="module")
def sets(data_root):
    cfg = DataConfig(data_root=str(data_root))
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


def test_frechet_distance_with_covariances_that_do_not_commute():
    """2x2 closed form: for M with positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))."""
    cov_a = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[0.5, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    assert not torch.allclose(cov_a @ cov_b, cov_b @ cov_a)
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    product = cov_a @ cov_b
    trace_root = math.sqrt(torch.trace(product).item() + 2 * math.sqrt(torch.det(product).item()))
    expected = 8.0 + torch.trace(cov_a + cov_b).item() - 2 * trace_root
    assert frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)
    # a singular covariance (a collapsed set) is still a finite distance
    assert math.isfinite(frechet_distance_gaussians(mu_a, torch.zeros(2, 2, dtype=torch.float64), mu_b, cov_b))


def test_precision_recall_on_a_line_with_known_answer():
    """real = 0, 1, ..., 9 with k = 1: every real ball has radius 1. fake = -3, 5, 20, 30 has radii 8, 8, 10, 10.
    Only 5 lies in a real ball (precision 1/4); 5's ball [-3, 13] holds every real point (recall 1)."""
    real = torch.arange(10, dtype=torch.float64)[:, None]
    fake = torch.tensor([[-3.0], [5.0], [20.0], [30.0]], dtype=torch.float64)
    assert precision_recall(real, fake, k=1) == pytest.approx((0.25, 1.0))
    # fakes bunched at one end: radii 0.5 (k = 1) cover only the real 0 and 1; each fake is within 1 of a real
    assert precision_recall(real, torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64), k=1) == pytest.approx((1.0, 0.2))


def test_near_copies_are_counted_even_when_the_median_does_not_move(sets):
    """30% of the samples planted as training images (plus faint noise): the median distance stays that of
    new digits, the near-copy fraction finds them."""
    g = torch.Generator().manual_seed(5)
    fresh = sets["reference"][:300]
    copies = sets["train"][torch.randperm(len(sets["train"]), generator=g)[:90]].int()
    copies = (copies + torch.randint(-3, 4, copies.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    planted = torch.cat([fresh[:210], copies])
    floor, found = memorisation(fresh, sets["train"]), memorisation(planted, sets["train"])
    assert found["near_copy_fraction"] == pytest.approx(0.3 + 0.7 * floor["near_copy_fraction"], abs=0.03)
    assert floor["near_copy_fraction"] < 0.05
    assert found["nn_train_distance_median"] > 0.5 * floor["nn_train_distance_median"]


def test_too_few_images_is_one_clear_error(classifier, sets):
    with pytest.raises(UserError, match="at least 4 images"):
        scorecard(classifier, sets["real"][:3], sets["reference"], sets["train"])


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
    test, labels = load_images(DataConfig(data_root=str(data_root)), train=False)
    assert accuracy(classifier, test[:500], labels[:500]) > 0.8
    assert DigitCNN().embed(torch.zeros(2, 1, 28, 28)).shape == (2, 128)


def test_scorecard_reads_this_machines_data_root_from_the_environment(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """The scorecard reads this machine's MNIST: DIFFUSION_DATA_ROOT (or --data-root), never a path from the
    checkpoint."""
    import diffusion.evaluate as evaluate_module
    from tests.conftest import run_inprocess
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda images, cfg, *a, **k: seen.append(cfg.data_root) or ({}, {}))
    monkeypatch.setattr(evaluate_module, "load_classifier", lambda path: None)
    elsewhere = str(tmp_path / "elsewhere")
    monkeypatch.setenv("DIFFUSION_DATA_ROOT", elsewhere)
    res = run_inprocess(capsys, "diffusion.evaluate", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert seen == [elsewhere]


def test_evaluate_reports_the_bound_it_computes(tiny_checkpoint, data_root, monkeypatch, capsys):
    """--bits-per-dim N: the bound of the first N test digits, without labels and given them, with its spread;
    the same numbers as likelihood.bits_per_dim called directly."""
    import json

    import diffusion.evaluate as evaluate_module
    from diffusion.checkpoint import load_network
    from diffusion.diffusion_utils import schedule_from_config
    from diffusion.likelihood import bits_per_dim
    from tests.conftest import run_inprocess

    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: ({"n": 4}, {}))
    monkeypatch.setattr(evaluate_module, "load_classifier", lambda path: None)
    res = run_inprocess(capsys, "diffusion.evaluate", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--json",
                        "--bits-per-dim", "6", "--strata", "5", "--data-root", str(data_root), "--seed", "3")
    assert res.returncode == 0, res.stderr
    card = json.loads(res.stdout)["samples"]
    loaded = load_network(tiny_checkpoint)
    images, labels = load_images(DataConfig(data_root=str(data_root)), train=False)
    x0 = images[:6].float() / 127.5 - 1
    for key, given in (("bits_per_dim", None), ("bits_per_dim_given_label", labels[:6])):
        bits = bits_per_dim(loaded.net, x0, schedule_from_config(loaded.config), 5, labels=given,
                            generator=torch.Generator().manual_seed(3))
        assert card[key] == pytest.approx(bits.mean().item(), rel=1e-6)
        assert card[key + "_se"] == pytest.approx((bits.std() / 6 ** 0.5).item(), rel=1e-6)
    assert 0 < card["bits_per_dim_given_label"] and card["bits_per_dim_strata"] == 5
    bad = run_inprocess(capsys, "diffusion.evaluate", "--checkpoint", str(tiny_checkpoint), "--bits-per-dim", "5",
                        "--strata", "500", "--n", "4", "--data-root", str(data_root))
    assert bad.returncode == 2 and "--strata must be in 1..49" in bad.stderr


def test_a_missing_classifier_is_said_before_any_sampling(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Sampling 1000 digits takes a minute: a scorecard that cannot be computed must not cost it first."""
    import diffusion.evaluate as evaluate_module
    from tests.conftest import assert_clean_error, run_inprocess

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before finding that there is no classifier")
    monkeypatch.setattr(evaluate_module, "draw", no_sampling)
    res = run_inprocess(capsys, "diffusion.evaluate", "--checkpoint", str(tiny_checkpoint), "--n", "4",
                        "--classifier", str(tmp_path / "none.pth"))
    assert_clean_error(res, "no classifier at")
