"""python -m diffusion.classifier: train the small MNIST CNN that the scorecard (python -m diffusion.evaluate) uses."""
from __future__ import annotations

from pathlib import Path

from diffusion.cli import build_parser, parse, run_cli
from diffusion.config import DataConfig
from diffusion.digit_classifier import DEFAULT_PATH, train_classifier
from diffusion.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("classifier", "Train the MNIST classifier used by the scorecard.",
                          (DataConfig, ("data_root", "download", "limit_train")))
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training set (default: 4)")
    parser.add_argument("--output", default=str(DEFAULT_PATH), help="where to save the classifier (default: %(default)s)")
    args, configs = parse(parser, argv)
    if not 1 <= args.epochs <= 1000:
        raise UserError(f"--epochs must be in 1..1000, got {args.epochs}")
    acc = train_classifier(configs[DataConfig].replace(dataset="mnist"), args.epochs, Path(args.output))
    print(f"test accuracy {acc:.4f}; saved {args.output}")


if __name__ == "__main__":
    run_cli(main)
