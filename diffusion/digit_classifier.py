"""The small MNIST CNN behind the scorecard (diffusion/metrics.py): its 128-dim penultimate layer is the feature
space for the Frechet distance and precision/recall, standing in for Inception features, which need a download
and were trained on other images."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from diffusion.checkpoint import load_weights, read_torch_file, save_checkpoint
from diffusion.config import DataConfig
from diffusion.dataloader import batches, epoch_order, load_images, to_unit_range
from diffusion.errors import UserError

DEFAULT_PATH = Path("diffusion") / "checkpoints" / "classifier" / "mnist_cnn.pth"
FEATURES = 128


class DigitCNN(nn.Module):
    """Two conv stages (28 -> 14 -> 7), a 128-dim feature layer, and 10 logits."""

    def __init__(self, channels: int = 1, num_classes: int = 10):
        super().__init__()
        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*stage(channels, 32), *stage(32, 64))
        # features are taken before the ReLU: dense, no dead dimensions to make covariances singular
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, FEATURES))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 128) features of images in [-1, 1]."""
        return self.features(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (digits are not flipped: they are not symmetric)."""
    dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
    return torch.roll(F.pad(x, (2, 2, 2, 2), value=-1), (dy, dx), dims=(2, 3))[..., 2:-2, 2:-2]


@torch.no_grad()
def accuracy(net: DigitCNN, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    net.eval()
    hits = sum((net(to_unit_range(images[i:i + batch])).argmax(1) == labels[i:i + batch]).sum().item()
               for i in range(0, len(images), batch))
    return hits / len(images)


def train_classifier(data: DataConfig, epochs: int, path: Path, lr: float = 2e-3, batch_size: int = 128,
                     seed: int = 0) -> float:
    """Train on data's training set, report test accuracy, save atomically; returns the accuracy."""
    images, labels = load_images(data, train=True)
    test_images, test_labels = load_images(data.replace(limit_train=0), train=False)
    torch.manual_seed(seed)
    net, g = DigitCNN(images.shape[1], int(labels.max()) + 1), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        order = epoch_order(len(images), seed, epoch)
        for x, y in tqdm(batches(images, labels, order, batch_size), desc=f"classifier epoch {epoch + 1}/{epochs}",
                         total=-(-len(images) // batch_size), unit="batch"):
            loss = F.cross_entropy(net(augment(x, g)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    acc = accuracy(net, test_images, test_labels)
    save_checkpoint({"model": net.state_dict(), "epoch": epochs, "step": steps, "test_accuracy": acc,
                     "channels": images.shape[1], "num_classes": int(labels.max()) + 1}, path)
    return acc


def load_classifier(path: Path) -> DigitCNN:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no classifier at {path}; train it once with `python -m diffusion.classifier` "
                        "(a few minutes on a CPU) or pass --classifier PATH")
    state = read_torch_file(path)
    if "model" not in state:
        raise UserError(f"{path} is not a classifier written by `python -m diffusion.classifier`")
    net = DigitCNN(state.get("channels", 1), state.get("num_classes", 10))
    load_weights(net, state["model"], path)
    return net.eval()
