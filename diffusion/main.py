"""python -m diffusion.main: train a DDPM on MNIST with the defaults and any --overrides."""
from __future__ import annotations

from diffusion.cli import build_parser, parse, run_cli
from diffusion.config import PARTS, RunConfig
from diffusion.train import train


def parse_run(argv: list[str] | None = None):
    parser = build_parser("main", "Train a DDPM on MNIST; a checkpoint is saved after every epoch.", *PARTS)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from PATH, or from the latest checkpoint in --ckpt-dir when no PATH "
                             "(with nothing saved there yet, start a fresh run)")
    args, configs = parse(parser, argv)
    return args, RunConfig(**{field: configs[part] for field, part in zip(("model", "data", "train", "sample", "runtime"), PARTS)})


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_run(argv)
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
