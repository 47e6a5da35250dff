"""Checkpoints written atomically and loaded without executing code.

Write: temporary file in the same folder, flush + fsync, os.replace (atomic on POSIX), then
the same for the `latest` pointer. A crash at any moment leaves every finished checkpoint whole.
Read: torch.load(weights_only=True), which refuses pickles that would build arbitrary objects.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from diffusion.errors import UserError

LATEST = "latest"  # a text file holding the name of the newest checkpoint
REQUIRED_KEYS = ("model", "ema", "config", "epoch", "step")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, path: Path, keep_last: int = 0) -> None:
    """Atomically write `state` to `path`, point `latest` at it, and prune old epoch checkpoints."""
    path = Path(path)
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
        _atomic_write(path.parent / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    except OSError as err:
        raise UserError(f"could not write checkpoint {path}: {err.strerror or err}; "
                        "the previous checkpoint is untouched") from None
    if keep_last:
        for old in sorted(path.parent.glob("epoch_*.pth"))[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """The checkpoint named by `latest`, else the newest epoch_*.pth; a clear error when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.exists():
        target = ckpt_dir / pointer.read_text().strip()
        if target.exists():
            return target
    found = sorted(ckpt_dir.glob("epoch_*.pth"))
    if not found:
        raise UserError(f"no checkpoint in {ckpt_dir}; train first with `python -m diffusion.main` "
                        "or pass --checkpoint PATH")
    return found[-1]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); one-line errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): not a torch.save archive")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                        f"(weights_only=True rejected it: {first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                        f"{str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a checkpoint of this project (expected keys {', '.join(REQUIRED_KEYS)})")
    return state


ARCHITECTURE = ("channels", "image_size", "num_classes", "base_channels", "channel_mults", "num_res_blocks",
                "attention_resolutions")


def check_architecture(saved: dict, cfg, path: Path) -> None:
    """One line naming the first architecture field where a checkpoint and the config disagree."""
    for name in ARCHITECTURE:
        mine, theirs = getattr(cfg, name), saved.get(name)
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if theirs is not None and mine != theirs:
            raise UserError(f"{path} was trained with {name}={theirs!r}, but the config asks for {mine!r}; "
                            f"drop --{name.replace('_', '-')} or use a matching checkpoint")


def load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    """load_state_dict with a one-line error when the architecture does not match."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()
        raise UserError(f"{path} was saved from a different architecture or image size than the config "
                        f"builds ({detail[1].strip()[:160] if len(detail) > 1 else detail[0][:160]})") from None
