"""python -m diffusion.main: train a DDPM on MNIST with the Config defaults and any --overrides."""
from __future__ import annotations

from diffusion.config import Config, build_parser, config_overrides, parse_command_line
from diffusion.errors import run_cli
from diffusion.train import train


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("main", "Train a DDPM on MNIST; a checkpoint is saved after every epoch.")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from PATH, or from the latest checkpoint in --ckpt-dir when no PATH "
                             "(with nothing saved there yet, start a fresh run)")
    args = parse_command_line(parser, "main", argv)
    train(Config(**config_overrides(args)), resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
