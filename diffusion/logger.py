"""Optional experiment logging: TensorBoard scalars per progress update and the preview grid per epoch."""
from __future__ import annotations

from pathlib import Path

import torch

from diffusion.config import LOGGERS
from diffusion.errors import UserError



class TensorBoardLogger:
    """Writes to OUT_DIR/tensorboard; view with `tensorboard --logdir diffusion/outputs/tensorboard`."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError('--logger tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"') from None
        self.writer = SummaryWriter(str(folder))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, grid: torch.Tensor, step: int) -> None:
        """grid: images in [-1, 1], (N, C, H, W)."""
        from torchvision.utils import make_grid

        self.writer.add_image(name, make_grid(grid.float().cpu(), nrow=10, normalize=True, value_range=(-1, 1)), step)

    def close(self) -> None:
        self.writer.close()


class NoLogger:
    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def image(self, name: str, grid: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(kind: str, out_dir: str, rank: int = 0):
    """The logger --logger asks for; only rank 0 writes."""
    if kind == "tensorboard" and rank == 0:
        return TensorBoardLogger(Path(out_dir) / "tensorboard")
    return NoLogger()
