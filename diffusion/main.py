"""python -m diffusion.main: train a DDPM on MNIST with the defaults and any --overrides."""
from __future__ import annotations

import sys

from diffusion.cli import build_parser, parse, run_cli
from diffusion.config import PARTS, RunConfig, paper_flags
from diffusion.train import train


def parse_run(argv: list[str] | None = None):
    parser = build_parser("main", "Train a DDPM on MNIST; a checkpoint is saved after every epoch.", *PARTS)
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from PATH, or from the latest checkpoint in --ckpt-dir when no PATH "
                             "(with nothing saved there yet, start a fresh run)")
    parser.add_argument("--paper", action="store_true", default=False,
                        help="the paper's DDPM: " + " ".join(paper_flags()) + " (flags given beside it win); sample it "
                             "with python -m diffusion.sampling --paper")
    argv = sys.argv[1:] if argv is None else argv
    args, configs = parse(parser, paper_flags() + argv if "--paper" in argv else argv)
    return args, RunConfig(**{field: configs[part] for field, part in zip(("model", "data", "train", "sample", "runtime"), PARTS)})


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_run(argv)
    train(cfg, resume=args.resume)


if __name__ == "__main__":
    run_cli(main)
