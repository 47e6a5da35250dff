"""The offline MNIST scorecard: Frechet distance, precision and recall in the features of the project's own MNIST
classifier (diffusion/digit_classifier.py), class balance and memorisation, each beside the same score for N real
training images (the floor): Frechet distance is biased upward at small N, so compare numbers only at equal N."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion.config import DataConfig
from diffusion.dataloader import load_images, to_unit_range
from diffusion.diffusion_utils import schedule_from_config
from diffusion.digit_classifier import DigitCNN
from diffusion.errors import UserError
from diffusion.likelihood import bits_per_dim


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


def real_sets(data: DataConfig, n: int, seed: int = 0):
    """(reference test images, N random training images for the floor, all training images) of MNIST."""
    base = data.replace(dataset="mnist", limit_train=0)
    train, _ = load_images(base, train=True)
    test, _ = load_images(base, train=False)
    g = torch.Generator().manual_seed(seed)
    if n > len(test):
        raise UserError(f"--n {n} exceeds the {len(test)} test images")
    return test[torch.randperm(len(test), generator=g)[:n]], train[torch.randperm(len(train), generator=g)[:n]], train


def evaluate(images: torch.Tensor, data: DataConfig, net: DigitCNN, digit: int | None = None) -> tuple[dict, dict]:
    """(scorecard of the samples, scorecard of real training images at the same N), features from net."""
    check_enough(images)
    reference, floor_images, train = real_sets(data, len(images))
    card = scorecard(net, images, reference, train, digit)
    # the floor's memorisation column: held-out test images against the training set
    floor = scorecard(net, floor_images, reference, train, digit)
    floor.update(memorisation(reference, train))
    return card, floor


def likelihood_scores(loaded, data: DataConfig, n: int, strata: int, device: torch.device, seed: int = 0) -> dict:
    """Bits per dimension of the first n test digits in fp32, without labels (the paper's p(x)) where the
    network learned that, and given each digit's label (p(x | label)) where it is conditional."""
    images, labels = load_images(data.replace(limit_train=0), train=False)
    if n > len(images):
        raise UserError(f"--bits-per-dim {n} exceeds the {len(images)} test images")
    x0, labels = images[:n].float() / 127.5 - 1, labels[:n]
    net, schedule = loaded.net.to(device).float().eval(), schedule_from_config(loaded.config)
    card = {"bits_per_dim_n": n, "bits_per_dim_strata": strata}
    modes = {"bits_per_dim": None, "bits_per_dim_given_label": labels}
    for key, given in modes.items():
        if not (loaded.config.num_classes if given is not None else loaded.config.learned_unconditional):
            continue
        g = torch.Generator().manual_seed(seed)
        bits = bits_per_dim(net, x0, schedule, strata, labels=given, device=device, generator=g, progress=True)
        card[key], card[key + "_se"] = bits.mean().item(), (bits.std() / len(bits) ** 0.5).item() if n > 1 else 0.0
    return card
