"""Datasets: in-memory batches, MNIST / Fashion-MNIST / image folders, and their shapes in the config."""
import dataclasses

import pytest
import torch
from PIL import Image

from diffusion.config import DataConfig
from diffusion.dataloader import batches, dataset_shape, epoch_order, load_images, to_uint8, to_unit_range
from tests.conftest import TINY, make_fake_mnist, run_cli


def test_pixels_in_unit_range_and_back():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_unit_range(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u8)


def test_mnist_loads_whole_set_as_uint8(data_root):
    images, labels = load_images(DataConfig(data_root=str(data_root)))
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28) and len(images) == len(labels)
    assert dataset_shape(images, labels) == {"channels": 1, "image_size": 28, "num_classes": 10}
    limited, _ = load_images(DataConfig(data_root=str(data_root), limit_train=100))
    assert torch.equal(limited, images[:100])


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a, b, c = epoch_order(1000, 0, 3), epoch_order(1000, 0, 3), epoch_order(1000, 0, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, torch.arange(1000))


def test_ranks_split_every_global_batch():
    n, batch, world = 1000, 64, 2
    single = epoch_order(n, 0, 0)
    ranks = [epoch_order(n, 0, 0, r, world, batch) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == n // batch * batch // world
    for i in range(n // batch):  # global batch i = rank 0's batch i + rank 1's batch i
        together = torch.cat([r[i * 32:(i + 1) * 32] for r in ranks])
        assert torch.equal(together, single[i * batch:(i + 1) * batch])


def test_batches_cover_the_order_and_resume_skips():
    images, labels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1), torch.arange(10)
    order = torch.randperm(10)
    got = [y for _, y in batches(images, labels, order, 4)]
    assert [len(y) for y in got] == [4, 4, 2] and torch.equal(torch.cat(got), order)
    assert torch.equal(next(iter(batches(images, labels, order, 4, start=1)))[1], order[4:8])


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    root = make_fake_mnist(tmp_path, folder="FashionMNIST")
    images, labels = load_images(DataConfig(dataset="fashion-mnist", data_root=str(root), download=False))
    assert images.shape[1:] == (1, 28, 28) and int(labels.max()) == 9


def make_folder(root, mode: str, n_per_class: int = 6, size: int = 20):
    g = torch.Generator().manual_seed(0)
    for cls in ("cats", "dogs", "owls"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = torch.randint(0, 256, (size, size, 3 if mode == "RGB" else 1), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.squeeze(-1).numpy(), mode=mode).save(root / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_image_folder_channels_and_classes(tmp_path, mode, channels):
    root = make_folder(tmp_path / "imgs", mode)
    images, labels = load_images(DataConfig(dataset="folder", data_root=str(root)), image_size=16)
    assert images.shape == (18, channels, 16, 16)
    assert dataset_shape(images, labels) == {"channels": channels, "image_size": 16, "num_classes": 3}


def test_folder_dataset_trains_and_samples_end_to_end(tmp_path):
    root = make_folder(tmp_path / "imgs", "RGB")
    res = run_cli("diffusion.main", *TINY, "--dataset", "folder", "--data-root", str(root), "--image-size", "16",
                  "--epochs", "1", "--batch-size", "6", "--ckpt-dir", str(tmp_path / "ck"), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    from diffusion.checkpoint import load_checkpoint
    cfg = load_checkpoint(tmp_path / "ck" / "epoch_001.pth")["model_config"]
    assert (cfg["channels"], cfg["num_classes"], cfg["image_size"]) == (3, 3, 16)
    res = run_cli("diffusion.sampling", "--ckpt-dir", str(tmp_path / "ck"), "--digit", "2", "--num-images", "4",
                  "--output", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "s.png").mode == "RGB"


def test_missing_folder_is_a_clear_error(tmp_path):
    res = run_cli("diffusion.main", "--dataset", "folder", "--data-root", str(tmp_path / "none"))
    assert res.returncode == 2 and "no image folder" in res.stderr and "Traceback" not in res.stderr
