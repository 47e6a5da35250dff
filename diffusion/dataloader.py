"""Datasets held in memory as one uint8 tensor, cut into shuffled batches by indexing.

On a CPU, per-image PIL decoding in a DataLoader costs more than the model step, so each
dataset is decoded once (torchvision reads MNIST's IDX files straight into a tensor) and
batches are slices of a random permutation. Pixels become floats in [-1, 1] per batch.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from torchvision import datasets, transforms

from diffusion.errors import UserError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def load_images(data, train: bool = True, image_size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) for data.dataset (a DataConfig); the first data.limit_train
    when set. An ImageFolder tree is resized to image_size."""
    if data.dataset == "folder":
        images, labels = _load_folder(Path(data.data_root), image_size)
    else:
        cls = datasets.MNIST if data.dataset == "mnist" else datasets.FashionMNIST
        if data.dataset == "fashion-mnist":
            _unpack_debian_fashion(Path(data.data_root))
        ds = _open_torchvision(cls, Path(data.data_root), train, data.download)
        images, labels = ds.data.unsqueeze(1), ds.targets.long()
        _check_labels(images, labels, Path(data.data_root) / cls.__name__ / "raw", train)
    if train and data.limit_train:
        images, labels = images[: data.limit_train], labels[: data.limit_train]
    return images, labels


def _check_labels(images: torch.Tensor, labels: torch.Tensor, folder: Path, train: bool) -> None:
    """The IDX label file must match its image file: one label per image, each one of the dataset's 10 classes."""
    name = folder / f"{'train' if train else 't10k'}-labels-idx1-ubyte"
    if len(labels) != len(images):
        raise UserError(f"{name} holds {len(labels)} labels for {len(images)} images; replace it with the original file")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
        raise UserError(f"{name} holds a label outside 0..9 ({int(labels.max())}); replace it with the original file")


def test_digit(data, index: int) -> tuple[torch.Tensor, int]:
    """MNIST test image number `index` (uint8 (C, H, W)) and its label, from the files on disk (no download)."""
    images, labels = load_images(data.replace(download=False, limit_train=0), train=False)
    if not 0 <= index < len(images):
        raise UserError(f"there is no test digit {index}: the test set has digits 0..{len(images) - 1}")
    return images[index], int(labels[index])


def dataset_shape(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The Config fields a dataset decides: channels, image size and number of classes."""
    return {"channels": images.shape[1], "image_size": images.shape[-1], "num_classes": int(labels.max()) + 1}


def _open_torchvision(cls, root: Path, train: bool, download: bool):
    folder = root / cls.__name__ / "raw"
    if all((folder / f).exists() for f in MNIST_FILES):
        try:
            return cls(str(root), train=train, download=False)
        except Exception as err:  # present but truncated or not IDX files
            raise UserError(f"the {cls.__name__} files in {folder} are unreadable ({type(err).__name__}: "
                            f"{str(err)[:120]}); replace them with the original IDX files") from None
    if download:
        try:
            return cls(str(root), train=train, download=True)
        except Exception as err:  # no internet, a mirror down, a read-only disk...
            reason = f"download failed ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})"
    else:
        reason = "--no-download was given"
    files = ", ".join(f.replace("mnist", "") for f in MNIST_FILES)
    raise UserError(f"{cls.__name__} not found in {folder} (expected {files}) and {reason}; "
                    f"put the files there, or pass --data-root DIR / set DIFFUSION_DATA_ROOT to the folder holding {cls.__name__}/raw")


def _unpack_debian_fashion(root: Path) -> None:
    """Use Debian's dataset-fashion-mnist .gz files when torchvision's layout is missing."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in MNIST_FILES) or not DEBIAN_FASHION.is_dir():
        return
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        src = DEBIAN_FASHION / f"{name}.gz"
        if src.exists():
            with gzip.open(src, "rb") as fin, open(raw / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def _load_folder(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An ImageFolder tree (one sub-folder per class), resized to size x size, gray or RGB as the images are."""
    try:
        probe = datasets.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"no image folder at {root}: {err}; expected {root}/<class name>/<image files>") from None
    gray = all(Image.open(path).mode in ("L", "1", "I;16") for path, _ in probe.samples[:16])
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    ds = datasets.ImageFolder(str(root), transform=tf, loader=lambda p: Image.open(p).convert("L" if gray else "RGB"))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, torch.tensor(ds.targets, dtype=torch.long)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, batch_size: int = 1) -> torch.Tensor:
    """This rank's shuffled indices for an epoch; depends only on (seed, epoch), so resume replays it.

    With `world` processes, rank r takes the r-th slice of every global batch of `batch_size`, so the
    union over ranks of step i is exactly the single-process batch i (an incomplete last batch is dropped).
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if world == 1:
        return perm
    full = n // batch_size * batch_size
    return perm[:full].view(-1, world, batch_size // world)[:, rank].reshape(-1)


def batches(images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int,
            start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (x in [-1, 1], labels) in `order`, skipping the first `start` batches (mid-epoch resume)."""
    order = order.to(images.device)
    for i in range(start * batch_size, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield to_unit_range(images[idx]), labels[idx]


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
