"""Checkpoints and exported folders: written whole or not at all, read without executing code.

Write: temporary file in the same folder, flush + fsync, os.replace (atomic on POSIX), then the same for the
`latest` pointer. A crash at any moment leaves every finished checkpoint whole. An exported folder is written
beside its destination and swapped in, so a kill leaves the old model, the new one, or a folder that is refused.
Read: torch.load(weights_only=True), which refuses pickles that would build arbitrary objects, and safetensors.

A checkpoint holds the weights, what training fixes (`model_config`: the network's shape, its noise schedule and
labels) and what --resume needs; never sampling or runtime settings, which belong to whoever samples.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from diffusion.config import ModelConfig, build, learns_unconditional
from diffusion.errors import UserError
from diffusion.model import UNet, build_model

LATEST = "latest"  # a text file holding the name of the newest checkpoint
# 7: stem_skip; 6: attention_heads, level_skips; 5: prediction; 4: patch_size; 3: model_config apart from
# training settings; 2: one flat config; 1: linear betas not scaled to T
FORMAT = 7
UNSAVED_DEFAULTS = {"patch_size": 1, "prediction": "eps", "schedule": "linear",  # what a model saved without them had
                    "attention_heads": 4, "level_skips": True}
REQUIRED_KEYS = ("model", "ema", "epoch", "step")
WEIGHTS, CONFIG = "model.safetensors", "config.json"  # an exported folder
MAX_CONFIG_BYTES = 100_000


def with_unsaved_defaults(values: dict) -> dict:
    """A saved model config completed with what a model saved without a field had. Before stem_skip, the stem's
    skip came and went with the other level skips."""
    values = {**UNSAVED_DEFAULTS, **values}
    return {"stem_skip": values["level_skips"], **values}


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pth"


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


def check_writable_folder(folder: Path, what: str) -> None:
    """Fail before work starts, not after, when `folder` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise UserError(f"{what} {folder} is not a writable folder ({err.strerror or err})") from None


def check_room(folder: Path, model: torch.nn.Module, what: str) -> None:
    """Fail before work starts when `folder` cannot hold the next checkpoint beside the last one: the weights,
    their EMA and Adam's two moments, written to a temporary file before the old one is replaced."""
    need = 2 * 4 * sum(p.numel() * p.element_size() for p in model.parameters()) + 2**20
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"{what} {folder} has {free / 2**20:.0f} MB free; a checkpoint of this model needs about "
                        f"{need / 2**20:.0f} MB (the new file is written beside the old one)")


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


def resolve_checkpoint(checkpoint: str | Path | None, ckpt_dir: str | Path) -> Path:
    """--checkpoint PATH when given (DIR/model.safetensors means the exported folder DIR), else the latest
    checkpoint in --ckpt-dir."""
    if checkpoint:
        path = Path(checkpoint)
        return path.parent if path.name in (WEIGHTS, CONFIG) else path
    found = find_latest(Path(ckpt_dir))
    if found is None:
        raise UserError(f"no checkpoint in {ckpt_dir}; train first with `python -m diffusion.main` "
                        "or pass --checkpoint PATH")
    return found


def read_torch_file(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load(weights_only=True) with one-line errors for missing, corrupt or foreign files."""
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
                        f"{_first_line(err)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a checkpoint of this project")
    return state


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A training checkpoint of this project, any format, read safely."""
    state = read_torch_file(path, device)
    if any(k not in state for k in REQUIRED_KEYS) or not ("model_config" in state or "config" in state):
        raise UserError(f"{path} is not a checkpoint of this project (expected keys "
                        f"{', '.join(REQUIRED_KEYS)} and model_config)")
    saved = state.get("config", {})
    if state.get("format", 1) < 2 and saved.get("schedule") == "linear" and saved.get("timesteps") != 1000:
        raise UserError(f"{path} was trained by an earlier version with an unscaled linear schedule at "
                        f"T = {saved.get('timesteps')}, whose x_T is not pure noise; retrain it with this version")
    return state


def model_config(state: dict, where: Path | str) -> ModelConfig:
    """What training fixed, from a checkpoint or exported config of any format. Format 2 kept one flat dict of
    every setting: its model fields are taken, and whether eps without a label was learned follows p_uncond."""
    if "model_config" in state:
        values = state["model_config"]
        if not isinstance(values, dict):
            raise UserError(f"{where}: model_config must be a table of settings")
        return build(ModelConfig, with_unsaved_defaults(values), str(where))
    flat = state.get("config")
    if not isinstance(flat, dict):
        raise UserError(f"{where} has no model_config")
    names = {f.name for f in fields(ModelConfig)} - {"learned_unconditional"}
    values = with_unsaved_defaults({k: v for k, v in flat.items() if k in names})
    values["learned_unconditional"] = learns_unconditional(values.get("num_classes", 10), flat.get("p_uncond", 0.1))
    return build(ModelConfig, values, str(where))


def check_same_model(saved: ModelConfig, asked: ModelConfig, path: Path) -> None:
    """One line naming the first setting fixed by training where a checkpoint and the request disagree."""
    for f in fields(ModelConfig):
        theirs, mine = getattr(saved, f.name), getattr(asked, f.name)
        if theirs != mine:
            flag = "--" + f.name.replace("_", "-")
            value = " ".join(map(str, theirs)) if isinstance(theirs, tuple) else theirs
            raise UserError(f"{path} was trained with {flag} {value}, but {mine!r} was asked for: the network only "
                            f"knows what it was trained on; give {flag} {value} or leave it out, or use another checkpoint")


# what a guide must share with the network it guides: the same diffusion and labels; its width, depth and
# output parametrisation may differ (Karras et al. 2024 guide with a smaller network)
GUIDE_SHARES = ("image_size", "channels", "num_classes", "timesteps", "schedule", "beta_start", "beta_end")


def check_can_guide(guide: ModelConfig, guided: ModelConfig, path: Path, labelled: bool = True) -> None:
    """One line naming the first setting of the diffusion or the labels where a guide and its network differ;
    without labels the guide is asked for eps with the null label, so it must have learned it."""
    for name in GUIDE_SHARES:
        theirs, mine = getattr(guide, name), getattr(guided, name)
        if theirs != mine:
            raise UserError(f"{path} cannot guide this network: it was trained with {name.replace('_', ' ')} "
                            f"{theirs}, the network with {mine}; a guide must share the diffusion and the labels")
    if not labelled and not guide.learned_unconditional:
        raise UserError(f"{path} cannot guide sampling without labels: it was trained with --p-uncond 0, so it has "
                        f"no eps without a label")


def load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    """load_state_dict after checking names, shapes and dtypes against the module, and that every weight is finite."""
    expected = module.state_dict()
    if not isinstance(weights, dict) or weights.keys() != expected.keys():
        missing = sorted(set(expected) - set(weights or {}))[:3] if isinstance(weights, dict) else []
        raise UserError(f"{path} was saved from a different architecture than its config builds"
                        f"{' (missing ' + ', '.join(missing) + ')' if missing else ''}")
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            raise UserError(f"{path}: weight {name} has shape {tuple(getattr(value, 'shape', ()))}, the config "
                            f"builds {tuple(expected[name].shape)}")
        if value.dtype != expected[name].dtype:
            raise UserError(f"{path}: weight {name} is {value.dtype}, the network holds {expected[name].dtype}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{path}: weight {name} holds NaN or infinite values; this model cannot sample")
    module.load_state_dict(weights)


@dataclass(frozen=True)
class Loaded:
    """A network ready to sample, what training fixed for it, and which epoch it is (None: an exported folder)."""
    net: UNet
    config: ModelConfig
    path: Path
    epoch: int | None


def load_network(path: Path, use_ema: bool = True) -> Loaded:
    """Rebuild the U-Net from a checkpoint's or exported folder's model_config and load its (EMA) weights."""
    path = Path(path)
    if is_exported(path):
        if not use_ema:
            raise UserError(f"{path} is an exported model, which holds only the EMA weights; drop --no-ema")
        config, weights, epoch = read_exported(path)
    else:
        state = load_checkpoint(path)
        config, weights, epoch = model_config(state, path), state["ema" if use_ema else "model"], state["epoch"]
    net = build_model(config)
    load_weights(net, weights, path)
    return Loaded(net.eval(), config, path, epoch)


# --- exported folders: model.safetensors + config.json, no pickle at all (the Hugging Face convention) ---

def is_exported(path: Path) -> bool:
    """Whether `path` is meant as an exported folder (a folder that is not a checkpoint file)."""
    return Path(path).is_dir()


def read_exported(folder: Path) -> tuple[ModelConfig, dict, None]:
    """(model_config, EMA weights, None) from an exported folder, every value checked before anything is built."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not an exported model: it has no {' and no '.join(missing)} "
                        f"(write one with `python -m diffusion.export {folder}`)")
    try:
        with open(folder / CONFIG, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise UserError(f"{folder / CONFIG} is larger than {MAX_CONFIG_BYTES // 1000} kB; a model's config is "
                            "a few hundred bytes")
        meta = json.loads(text.decode("utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {folder / CONFIG}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"{folder / CONFIG} is not valid JSON ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{folder / CONFIG} must hold a JSON object")
    config = model_config(meta, folder / CONFIG)
    try:
        weights = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{folder / WEIGHTS} is not a readable safetensors file ({_first_line(err)})") from None
    return config, weights, None


def export(checkpoint: Path, folder: Path) -> None:
    """Write the checkpoint's EMA weights and model_config to `folder`, replacing any folder there as a whole."""
    from safetensors.torch import save

    state = load_checkpoint(checkpoint)
    config = model_config(state, checkpoint)
    weights = {k: v.detach().cpu().contiguous() for k, v in state["ema"].items()}
    meta = {"format": FORMAT, "epoch": state["epoch"], "step": state["step"], "model_config": config.to_dict()}
    folder = Path(folder)
    if folder.exists() and not is_exported(folder):
        raise UserError(f"{folder} exists and is not a folder; choose another name")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG).is_file():
        raise UserError(f"{folder} holds other files; export into a new or an exported folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        new = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.new."))
    except OSError as err:
        raise UserError(f"could not write {folder}: {err.strerror or err}") from None
    try:
        _atomic_write(new / WEIGHTS, lambda f: f.write(save(weights, metadata={"format": str(FORMAT)})))
        _atomic_write(new / CONFIG, lambda f: f.write(json.dumps(meta, indent=1).encode() + b"\n"))
        _swap_in(new, folder)
    except OSError as err:
        raise UserError(f"could not write {folder}: {err.strerror or err}; any earlier export there is unchanged") from None
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone already when the swap succeeded


def _swap_in(new: Path, folder: Path) -> None:
    """Replace `folder` by `new`: the old folder is renamed aside first, so at every moment one whole model is there."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(folder.parent)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__
