"""python -m diffusion.export DIR: the EMA weights as safetensors plus a config.json, to share a trained model.

The folder holds no pickle at all (the Hugging Face convention): model.safetensors is a flat table of
tensors and config.json plain JSON, so loading it runs no code. sampling, evaluate and the demo load such a
folder with --checkpoint DIR.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusion.checkpoint import FORMAT, _atomic_write, load_checkpoint, resolve_checkpoint
from diffusion.config import Config, from_dict, runtime_fields
from diffusion.errors import UserError, run_cli

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def exported_config(config: dict) -> dict:
    """What a shared model needs: how it was trained, without this machine's paths or sampling preferences
    (those come from the command line of whoever samples)."""
    private = set(runtime_fields()) | {"data_root"}
    return {k: v for k, v in from_dict(config).to_dict().items() if k not in private}


def export(checkpoint: Path, folder: Path) -> None:
    from safetensors.torch import save

    state = load_checkpoint(checkpoint)
    weights = {k: v.detach().cpu().contiguous() for k, v in state["ema"].items()}
    config = {"format": state.get("format", 1), "epoch": state["epoch"], "step": state["step"],
              "config": exported_config(state["config"])}
    try:
        _atomic_write(folder / WEIGHTS, lambda f: f.write(save(weights, metadata={"format": str(FORMAT)})))
        _atomic_write(folder / CONFIG, lambda f: f.write(json.dumps(config, indent=1).encode() + b"\n"))
    except OSError as err:
        raise UserError(f"could not write {folder}: {err.strerror or err}") from None


def is_exported(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def load_exported(folder: Path) -> dict:
    """An exported folder as the dict load_checkpoint returns (its EMA weights serve as both weight sets)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} has {CONFIG} but no {WEIGHTS}; export it again with `python -m diffusion.export`")
    try:
        meta = json.loads((folder / CONFIG).read_text())
        config = {**Config().to_dict(), **meta["config"]}
        weights = load_file(folder / WEIGHTS)
    except (ValueError, KeyError, TypeError, SafetensorError) as err:
        raise UserError(f"{folder} is not a model exported by this project ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    return {"ema": weights, "config": config, "format": meta.get("format", 1), "epoch": meta.get("epoch", 0),
            "step": meta.get("step", 0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffusion.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to export (default: the latest in --ckpt-dir)")
    parser.add_argument("--ckpt-dir", default=Config().ckpt_dir, help="where to look for it (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = parser.parse_args(argv)
    path = resolve_checkpoint(args.checkpoint, args.ckpt_dir)
    export(path, Path(args.folder))
    size = sum(f.stat().st_size for f in Path(args.folder).iterdir() if f.name in (WEIGHTS, CONFIG))
    print(f"exported the EMA weights of {path} to {args.folder} ({WEIGHTS} + {CONFIG}, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
