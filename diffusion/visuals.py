"""Pictures: sample grids, the loss curve, and the denoising animation."""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO

import torch
from torchvision.utils import make_grid, save_image

from diffusion.dataloader import to_uint8


def save_grid(x: torch.Tensor, path: Path | BinaryIO, nrow: int = 4) -> None:
    """Save images in [-1, 1] as one grid PNG, to a path or an open binary file."""
    if isinstance(path, (str, Path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(x.float().cpu(), path, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2, pad_value=1,
               format="png")


def grid_png(x: torch.Tensor, nrow: int = 4) -> bytes:
    """The PNG bytes save_grid would write."""
    buffer = io.BytesIO()
    save_grid(x, buffer, nrow)
    return buffer.getvalue()


def with_inpainting_input(known: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, nrow: int) -> torch.Tensor:
    """x's images in rows of nrow, each row led by the input with the part that was generated shown grey: the
    grid says what was kept. Write it with nrow + 1 images a row."""
    shown = torch.where(keep[0].to(known.device), known, torch.zeros_like(known)).to(x.device, x.dtype)
    return torch.cat([torch.cat([shown[None], x[i:i + nrow]]) for i in range(0, len(x), nrow)])


def save_loss_curve(history: list[dict], curve: list[list[float]], path: Path) -> None:
    """Training loss against step (rank 0's batch loss at each progress update) and each epoch's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if curve:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=0.8, alpha=0.6, label="batch loss")
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], "o-", label="epoch mean")
    ax.set(xlabel="step", ylabel="L_simple", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Animation:
    """Collects frames of the reverse process from a sampler callback and writes an animated GIF.
    Batches sampled one after another add their images to the same frames."""

    def __init__(self, total_steps: int, nrow: int, with_x0: bool = False, frames: int = 40):
        self.every = max(1, total_steps // frames)
        self.total, self.nrow, self.with_x0 = total_steps, nrow, with_x0
        self.xt: dict[int, list] = defaultdict(list)
        self.x0: dict[int, list] = defaultdict(list)

    def __call__(self, i: int, xt: torch.Tensor, x0: torch.Tensor) -> None:
        if i % self.every and i != self.total - 1:
            return
        self.xt[i].append(to_uint8(xt).cpu())
        if self.with_x0:
            self.x0[i].append(to_uint8(x0).cpu())

    def frames(self) -> list[torch.Tensor]:
        """One uint8 grid per kept step: x_t, with the network's current guess of x_0 on its right."""
        grids = []
        for i in sorted(self.xt):
            grid = make_grid(torch.cat(self.xt[i]), nrow=self.nrow, padding=2, pad_value=255)
            if self.with_x0:
                grid = torch.cat([grid, make_grid(torch.cat(self.x0[i]), nrow=self.nrow, padding=2, pad_value=255)], dim=2)
            grids.append(grid)
        return grids

    def save(self, path: Path, ms_per_frame: int = 80) -> None:
        from torchvision.transforms.functional import to_pil_image

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frames = self.frames()
        images = [to_pil_image(f) for f in frames] + [to_pil_image(frames[-1])] * 12  # hold the end
        images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
