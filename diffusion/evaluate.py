"""python -m diffusion.evaluate: an offline MNIST scorecard for generated digits.

Features come from the project's own MNIST classifier (diffusion/classifier.py), so nothing is
downloaded. Every score is printed beside the same score for N real training images (the floor),
because Frechet distance is biased upward at small N: compare numbers only at equal N.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.checkpoint import resolve_checkpoint
from diffusion.classifier import DEFAULT_PATH, DigitCNN, load_classifier
from diffusion.config import Config, build_parser, config_overrides, parse_command_line
from diffusion.dataloader import load_images, to_uint8, to_unit_range
from diffusion.errors import UserError, run_cli
from diffusion.generation import generate, load_for_sampling, load_guide, sample_labels, settings_for_guide
from diffusion.sampling import add_sampling_args


@torch.no_grad()
def embed(net: DigitCNN, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 128) float64, class probabilities (N, 10)) for uint8 images (N, 1, 28, 28)."""
    feats, probs = [], []
    for i in range(0, len(images), batch):
        f = net.embed(to_unit_range(images[i:i + batch]))
        feats.append(f.double())
        probs.append(net.head(f).softmax(1))
    return torch.cat(feats), torch.cat(probs)


def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64 eigendecomposition)."""
    values, vectors = torch.linalg.eigh(m)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the Frechet distance of two Gaussians.

    (S_a^1/2 S_b S_a^1/2)^1/2 has the trace of (S_a S_b)^1/2 but is symmetric, so eigh gives it exactly
    even when the covariances do not commute or are singular (a collapsed sample set).
    """
    root_a = sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_covmean)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets (N, D), Heusel et al. 2017."""
    a, b = a.double(), b.double()
    return frechet_distance_gaussians(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


K_NEAREST = 3  # neighbourhood size of the precision/recall manifolds
MIN_IMAGES = K_NEAREST + 1  # each image needs K others to define its k-NN ball


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEAREST) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019: a sample is 'in' a set's manifold if inside some member's k-NN ball."""
    def radii(x):  # distance to the k-th nearest neighbour, self excluded
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def coverage(points, ref, ref_radii):
        return (torch.cdist(points, ref) <= ref_radii[None]).any(dim=1).float().mean().item()

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def check_enough(images: torch.Tensor) -> None:
    if len(images) < MIN_IMAGES:
        raise UserError(f"need at least {MIN_IMAGES} images to score (k-nearest neighbours with k = {K_NEAREST}), "
                        f"got {len(images)}")


NEAR_COPY_RATIO = 1 / 3  # nearest / second-nearest training distance below this = a near-copy of one image


def nearest_train_distances(images: torch.Tensor, train: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """(N, 2) float64 pixel L2 distances (in [0, 1] units) from each image to its two nearest training images."""
    ref = train.flatten(1).double() / 255
    return torch.cat([torch.cdist(images[i:i + batch].flatten(1).double() / 255, ref).topk(2, largest=False).values
                      for i in range(0, len(images), batch)])


def memorisation(images: torch.Tensor, train: torch.Tensor) -> dict:
    """Median distance to the nearest training image, and the fraction of images much closer to one
    training image than to any other (a copy, not a new digit that happens to resemble many)."""
    d = nearest_train_distances(images, train)
    near_copy = (d[:, 0] < NEAR_COPY_RATIO * d[:, 1]) | (d[:, 0] == 0)
    return {"nn_train_distance_median": d[:, 0].median().item(), "near_copy_fraction": near_copy.double().mean().item()}


def scorecard(net: DigitCNN, images: torch.Tensor, reference: torch.Tensor, train: torch.Tensor,
              digit: int | None = None) -> dict:
    """All scores for one set of uint8 images against the reference (test) set."""
    check_enough(images)
    feats, probs = embed(net, images)
    ref_feats, _ = embed(net, reference)
    precision, recall = precision_recall(ref_feats, feats)
    hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(images)
    kl = float(sum(p * math.log(p * len(hist)) for p in hist.tolist() if p > 0))
    card = {"n": len(images), "fd": frechet_distance(feats, ref_feats), "precision": precision, "recall": recall,
            "confidence": probs.max(1).values.mean().item(), "class_kl_uniform": kl,
            "class_histogram": [round(p, 4) for p in hist.tolist()], **memorisation(images, train)}
    if digit is not None:
        card["digit_accuracy"] = (probs.argmax(1) == digit).float().mean().item()
    return card


def split_grid(path: Path, size: int = 28, pad: int = 2) -> torch.Tensor:
    """The images of a grid PNG written by save_grid (cells of size+pad, pad at the edges) as uint8 (N,1,H,W)."""
    grid = torch.from_numpy(np.array(Image.open(path).convert("L")))
    rows, cols = (grid.shape[0] - pad) // (size + pad), (grid.shape[1] - pad) // (size + pad)
    if rows < 1 or cols < 1 or (grid.shape[0] - pad) % (size + pad) or (grid.shape[1] - pad) % (size + pad):
        raise UserError(f"{path} is not a grid of {size}x{size} images with {pad}-pixel padding")
    cells = [grid[pad + r * (size + pad): pad + r * (size + pad) + size, pad + c * (size + pad): pad + c * (size + pad) + size]
             for r in range(rows) for c in range(cols)]
    return torch.stack(cells)[:, None]


def load_samples(path: Path) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) from an .npy (N x 28 x 28 uint8) or a PNG grid."""
    if not path.exists():
        raise UserError(f"samples file {path} does not exist")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.dtype != np.uint8 or array.ndim != 3:
            raise UserError(f"{path} must hold uint8 images N x H x W, got {array.dtype} {array.shape}")
        return torch.from_numpy(array)[:, None]
    return split_grid(path)


def format_table(card: dict, floor: dict) -> str:
    rows = [("Frechet distance (classifier features)", "fd", "{:.3f}"), ("precision (k=3)", "precision", "{:.3f}"),
            ("recall (k=3)", "recall", "{:.3f}"), ("mean classifier confidence", "confidence", "{:.3f}"),
            ("KL(class histogram || uniform)", "class_kl_uniform", "{:.4f}"),
            ("median L2 to nearest training image", "nn_train_distance_median", "{:.3f}"),
            ("near-copies of a training image", "near_copy_fraction", "{:.3f}")]
    if "digit_accuracy" in card:
        rows.append(("fraction classified as --digit", "digit_accuracy", "{:.3f}"))
    lines = [f"{'score (N = ' + str(card['n']) + ')':<42}{'samples':>10}{'real floor':>12}"]
    for name, key, fmt in rows:
        lines.append(f"{name:<42}{fmt.format(card[key]):>10}{fmt.format(floor[key]) if key in floor else '-':>12}")
    lines.append("class histogram: " + " ".join(f"{i}:{p:.2f}" for i, p in enumerate(card["class_histogram"])))
    return "\n".join(lines)


def real_sets(cfg: Config, n: int, seed: int = 0):
    """(reference test images, N random training images for the floor, all training images)."""
    base = dataclasses.replace(cfg, dataset="mnist", limit_train=0)
    train, _ = load_images(base, train=True)
    test, _ = load_images(base, train=False)
    g = torch.Generator().manual_seed(seed)
    if n > len(test):
        raise UserError(f"--n {n} exceeds the {len(test)} test images")
    return test[torch.randperm(len(test), generator=g)[:n]], train[torch.randperm(len(train), generator=g)[:n]], train


def evaluate(images: torch.Tensor, cfg: Config, classifier: Path, digit: int | None = None) -> tuple[dict, dict]:
    """(scorecard of the samples, scorecard of real training images at the same N)."""
    check_enough(images)
    net = load_classifier(classifier)
    reference, floor_images, train = real_sets(cfg, len(images))
    card = scorecard(net, images, reference, train, digit)
    # the floor's memorisation column: held-out test images against the training set
    floor = scorecard(net, floor_images, reference, train, digit)
    floor.update(memorisation(reference, train))
    return card, floor


def sample_for_scoring(net, cfg: Config, device, n: int, digit: int | None = None,
                       unconditional: bool = False, progress: bool = True, weak=None) -> torch.Tensor:
    """n uint8 samples, labelled, seeded and guided as `python -m diffusion.sampling --num-images n` would."""
    labels = sample_labels(cfg, n, digit, False, unconditional, cfg.seed, device)
    return to_uint8(generate(net, cfg, n, labels, device, seed=cfg.seed, progress=progress, weak=weak)).cpu()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("evaluate", "Score generated digits against MNIST with the project's classifier.")
    add_sampling_args(parser)
    parser.add_argument("--samples", default=None, help="score this .npy (N x 28 x 28 uint8) or PNG grid instead")
    parser.add_argument("--n", type=int, default=1000, help="samples to generate and score (default: 1000)")
    parser.add_argument("--classifier", default=str(DEFAULT_PATH), help="classifier from `python -m diffusion.classifier` (default: %(default)s)")
    parser.add_argument("--json", action="store_true", default=False, help="print JSON instead of a table")
    args = parse_command_line(parser, "evaluate", argv)
    overrides = config_overrides(args)
    if "data_root" not in overrides and "DIFFUSION_DATA_ROOT" in os.environ:
        overrides["data_root"] = os.environ["DIFFUSION_DATA_ROOT"]  # this machine's data, not the training machine's
    cfg = Config(**{**Config().to_dict(), **overrides})
    if args.samples:
        images = load_samples(Path(args.samples))
    else:
        if args.n < MIN_IMAGES:
            raise UserError(f"--n must be at least {MIN_IMAGES}, got {args.n}")
        path = resolve_checkpoint(args.checkpoint, cfg.ckpt_dir)
        net, cfg, device = load_for_sampling(path, overrides, use_ema=not args.no_ema)
        weak, guide = load_guide(path, cfg, device, use_ema=not args.no_ema)
        labelled = cfg.num_classes > 0 and not args.unconditional
        cfg = settings_for_guide(cfg, overrides, weak is not None, labelled)
        if weak is None:
            guide = "classifier-free guidance" if labelled else "no labels, no guidance"
        print(f"sampling {path} with {guide}, w {cfg.guidance:g}, eta {cfg.eta:g}", file=sys.stderr)
        images = sample_for_scoring(net, cfg, device, args.n, args.digit, args.unconditional, weak=weak)
    card, floor = evaluate(images, cfg, Path(args.classifier), args.digit)
    print(json.dumps({"samples": card, "real_floor": floor}, indent=2) if args.json else format_table(card, floor))


if __name__ == "__main__":
    run_cli(main)
