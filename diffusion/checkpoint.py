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

from diffusion.config import trained_fields
from diffusion.errors import UserError

LATEST = "latest"  # a text file holding the name of the newest checkpoint
REQUIRED_KEYS = ("model", "ema", "config", "epoch", "step")
FORMAT = 2  # 2: linear betas scaled by 1000 / T (format 1 used 1e-4..0.02 for every T)


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
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable where the OS allows it. Best effort: Windows refuses to open a folder
    (PermissionError), and there os.replace is atomic all the same."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, path: Path, keep_last: int = 0) -> None:
    """Atomically write `state` to `path`, point `latest` at it, and prune old checkpoints: timed
    snapshots (step_*.pth) that a newer checkpoint supersedes, and all but the newest `keep_last`."""
    path = Path(path)
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
        _atomic_write(path.parent / LATEST, lambda f: f.write(path.name.encode() + b"\n"))
    except OSError as err:
        raise UserError(f"could not write checkpoint {path}: {err.strerror or err}; "
                        "the previous checkpoint is untouched") from None
    for old in path.parent.glob("step_*.pth"):
        if old != path:
            old.unlink(missing_ok=True)
    if keep_last:
        saved = sorted([*path.parent.glob("epoch_*.pth"), *path.parent.glob("step_*.pth")], key=_age)
        for old in saved[:-keep_last]:
            if old != path:
                old.unlink(missing_ok=True)


def _age(path: Path) -> tuple[float, str]:
    return path.stat().st_mtime, path.name


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint named by `latest`, else the newest *.pth in the folder, else None."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.exists():
        target = ckpt_dir / pointer.read_text().strip()
        if target.is_file():
            return target
    found = sorted(ckpt_dir.glob("*.pth"), key=_age)
    return found[-1] if found else None


def latest_checkpoint(ckpt_dir: Path) -> Path:
    """find_latest, with a clear error when the folder holds no checkpoint."""
    found = find_latest(ckpt_dir)
    if found is None:
        raise UserError(f"no checkpoint in {ckpt_dir}; train first with `python -m diffusion.main` "
                        "or pass --checkpoint PATH")
    return found


def resolve_checkpoint(checkpoint: str | Path | None, ckpt_dir: str | Path) -> Path:
    """--checkpoint PATH when given, else the latest checkpoint in --ckpt-dir."""
    return Path(checkpoint) if checkpoint else latest_checkpoint(Path(ckpt_dir))


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
    saved = state["config"]
    if state.get("format", 1) < 2 and saved.get("schedule") == "linear" and saved.get("timesteps") != 1000:
        raise UserError(f"{path} was trained by an earlier version with an unscaled linear schedule at "
                        f"T = {saved.get('timesteps')}, whose x_T is not pure noise; retrain it with this version")
    return state


def check_trained_fields(saved: dict, cfg, path: Path) -> None:
    """One line naming the first field fixed by training where a checkpoint and the config disagree."""
    for name in trained_fields():  # the architecture, and the noise schedule whose alpha_bar it learned
        mine, theirs = getattr(cfg, name), saved.get(name)
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if theirs is not None and mine != theirs:
            flag = "--" + name.replace("_", "-")
            value = " ".join(map(str, theirs)) if isinstance(theirs, tuple) else theirs
            raise UserError(f"{path} was trained with {flag} {value}, but {mine!r} was asked for: the network only "
                            f"knows what it was trained on; give {flag} {value} or leave it out, or use another checkpoint")


def load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    """load_state_dict with a one-line error when the architecture does not match."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()
        raise UserError(f"{path} was saved from a different architecture or image size than the config "
                        f"builds ({detail[1].strip()[:160] if len(detail) > 1 else detail[0][:160]})") from None
