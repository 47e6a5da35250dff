"""python -m diffusion.evaluate: score generated digits against MNIST, offline (diffusion/metrics.py).

Features come from the project's own MNIST classifier (python -m diffusion.classifier), so nothing is
downloaded. Every score is printed beside the same score for N real training images (the floor),
because Frechet distance is biased upward at small N: compare numbers only at equal N.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from diffusion.checkpoint import load_network, resolve_checkpoint
from diffusion.cli import add_generation_args, build_parser, parse, run_cli
from diffusion.config import DataConfig, RuntimeConfig, SampleConfig
from diffusion.dataloader import to_uint8
from diffusion.digit_classifier import DEFAULT_PATH, load_classifier
from diffusion.errors import UserError
from diffusion.generation import generate, prepare, sample_labels
from diffusion.metrics import MIN_IMAGES, check_enough, evaluate, likelihood_scores, load_samples
from diffusion.runtime import resolve_device

MAX_SCORED = 10_000  # the MNIST test set


def parser():
    p = build_parser("evaluate", "Score generated digits against MNIST with the project's classifier.",
                     SampleConfig, RuntimeConfig, (DataConfig, ("data_root", "download")))
    add_generation_args(p)
    p.add_argument("--samples", default=None, help="score this .npy (N x 28 x 28 uint8) or PNG grid instead")
    p.add_argument("--n", type=int, default=1000, help="samples to generate and score (default: 1000)")
    p.add_argument("--classifier", default=str(DEFAULT_PATH),
                   help="classifier from `python -m diffusion.classifier` (default: %(default)s)")
    p.add_argument("--json", action="store_true", default=False, help="print JSON instead of a table")
    p.add_argument("--bits-per-dim", type=int, default=0, metavar="N",
                   help="also the paper's likelihood: the variational bound in bits per dimension on the first N "
                        "test digits (Ho et al. 2020, Table 1; 0 = skip)")
    p.add_argument("--strata", type=int, default=50,
                   help="network calls per digit for --bits-per-dim, one in each of this many ranges of steps "
                        "(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    args, configs = parse(parser(), argv)
    runtime_cfg = configs[RuntimeConfig]
    if args.samples and args.bits_per_dim:
        raise UserError("--bits-per-dim scores the network, not a file of samples; drop --samples or --bits-per-dim")
    if not args.samples and not MIN_IMAGES <= args.n <= MAX_SCORED:
        raise UserError(f"--n must be in {MIN_IMAGES}..{MAX_SCORED}, got {args.n}")
    if not 0 <= args.bits_per_dim <= MAX_SCORED:
        raise UserError(f"--bits-per-dim must be in 0..{MAX_SCORED} test digits, got {args.bits_per_dim}")
    loaded = None
    if args.samples:
        images = load_samples(Path(args.samples))
        check_enough(images)
        classifier = load_classifier(Path(args.classifier))
    else:
        loaded = load_network(resolve_checkpoint(args.checkpoint, runtime_cfg.ckpt_dir), use_ema=not args.no_ema)
        if args.bits_per_dim and not 1 <= args.strata < loaded.config.timesteps:
            raise UserError(f"--strata must be in 1..{loaded.config.timesteps - 1}, got {args.strata}")
        classifier = load_classifier(Path(args.classifier))  # before minutes of sampling, not after them
        images = draw(loaded, args, configs[SampleConfig], runtime_cfg)
    card, floor = evaluate(images, configs[DataConfig], classifier, args.digit)
    if args.bits_per_dim:
        card.update(likelihood_scores(loaded, configs[DataConfig], args.bits_per_dim, args.strata,
                                      resolve_device(runtime_cfg.device), runtime_cfg.seed))
    print(json.dumps({"samples": card, "real_floor": floor}, indent=2) if args.json else format_table(card, floor))


def draw(loaded, args, asked: SampleConfig, runtime_cfg: RuntimeConfig):
    """args.n uint8 samples, labelled, seeded and guided as `python -m diffusion.sampling --num-images N` would."""
    labels = sample_labels(loaded.config, args.n, args.digit, False, args.unconditional, runtime_cfg.seed)
    recipe, weak, runtime = prepare(loaded, asked, runtime_cfg, task="sample", labelled=labels is not None, n=args.n,
                                    use_ema=not args.no_ema)
    print(f"sampling {loaded.path} ({recipe})", file=sys.stderr)
    x = generate(loaded.net, loaded.config, recipe, args.n, labels, runtime, seed=runtime_cfg.seed, weak=weak)
    return to_uint8(x).cpu()


def format_table(card: dict, floor: dict) -> str:
    rows = [("Frechet distance (classifier features)", "fd", "{:.3f}"), ("precision (k=3)", "precision", "{:.3f}"),
            ("recall (k=3)", "recall", "{:.3f}"), ("mean classifier confidence", "confidence", "{:.3f}"),
            ("KL(class histogram || uniform)", "class_kl_uniform", "{:.4f}"),
            ("median L2 to nearest training image", "nn_train_distance_median", "{:.3f}"),
            ("near-copies of a training image", "near_copy_fraction", "{:.3f}")]
    if "digit_accuracy" in card:
        rows.append(("fraction classified as --digit", "digit_accuracy", "{:.3f}"))
    lines = [f"{'score (N = ' + str(card['n']) + ')':<42}{'samples':>10}{'real floor':>12}"]
    for name, key, fmt in rows:
        lines.append(f"{name:<42}{fmt.format(card[key]):>10}{fmt.format(floor[key]) if key in floor else '-':>12}")
    lines.append("class histogram: " + " ".join(f"{i}:{p:.2f}" for i, p in enumerate(card["class_histogram"])))
    for key, what in (("bits_per_dim", "no label"), ("bits_per_dim_given_label", "given the label")):
        if key in card:
            lines.append(f"bits/dim, variational bound, {what} ({card['bits_per_dim_n']} test digits, "
                         f"{card['bits_per_dim_strata']} strata): {card[key]:.3f} ± {card[key + '_se']:.3f}")
    return "\n".join(lines)



if __name__ == "__main__":
    run_cli(main)
