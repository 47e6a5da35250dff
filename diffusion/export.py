"""python -m diffusion.export DIR: the EMA weights as safetensors plus a config.json, to share a trained model.

The folder holds no pickle at all (the Hugging Face convention): model.safetensors is a flat table of
tensors and config.json plain JSON with what training fixed (model_config), so loading it runs no code.
sampling, evaluate and the demo load such a folder with --checkpoint DIR.
"""
from __future__ import annotations

from pathlib import Path

from diffusion.checkpoint import CONFIG, WEIGHTS, export, resolve_checkpoint
from diffusion.cli import build_parser, parse, run_cli
from diffusion.config import RuntimeConfig


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("export", __doc__.splitlines()[0], (RuntimeConfig, ("ckpt_dir",)))
    parser.add_argument("folder", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--checkpoint", default=None, help="checkpoint to export (default: the latest in --ckpt-dir)")
    args, configs = parse(parser, argv)
    path = resolve_checkpoint(args.checkpoint, configs[RuntimeConfig].ckpt_dir)
    export(path, Path(args.folder))
    size = sum(f.stat().st_size for f in Path(args.folder).iterdir() if f.name in (WEIGHTS, CONFIG))
    print(f"exported the EMA weights of {path} to {args.folder} ({WEIGHTS} + {CONFIG}, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_cli(main)
