"""Quality vs steps for each sampler, scored by the project's scorecard at a fixed N, plus seconds for
16 digits, and the fraction of --digit samples classified as the digit asked for. Not a test.

    python bench/samplers.py --data-root ../shared/data --n 500
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusion.checkpoint import load_network, resolve_checkpoint
from diffusion.config import DataConfig, RuntimeConfig, SampleConfig
from diffusion.dataloader import to_uint8
from diffusion.digit_classifier import DEFAULT_PATH, load_classifier
from diffusion.generation import generate, prepare, sample_labels
from diffusion.metrics import real_sets, scorecard

FAMILIES = ("dpmpp:0", "dpmpp:1", "ddim:0", "ddim:1", "ddpm")  # sampler:eta (eta 1 = stochastic, ancestral-like)
STEPS = (5, 10, 20, 50, 100)


def grid(families) -> list[tuple[str, float, int]]:
    rows = []
    for family in families:
        sampler, _, eta = family.partition(":")
        rows += [("ddpm", 0.0, 1000)] if sampler == "ddpm" else [(sampler, float(eta or 0), n) for n in STEPS]
    return rows


def draw(loaded, asked: SampleConfig, n: int, digit: int | None = None):
    """(n uint8 samples as `python -m diffusion.sampling --num-images n` draws them, seconds taken)."""
    labels = sample_labels(loaded.config, n, digit)
    recipe, weak, runtime = prepare(loaded, asked, RuntimeConfig(), task="sample", labelled=True, n=n, verbose=False)
    t0 = time.perf_counter()
    x = generate(loaded.net, loaded.config, recipe, n, labels, runtime, weak=weak, progress=False)
    return to_uint8(x).cpu(), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="default: the latest in diffusion/checkpoints")
    parser.add_argument("--data-root", default=DataConfig().data_root)
    parser.add_argument("--classifier", default=str(DEFAULT_PATH))
    parser.add_argument("--n", type=int, default=500, help="samples per configuration (same N for every row)")
    parser.add_argument("--per-digit", type=int, default=100, help="samples per digit for the --digit check")
    parser.add_argument("--guidance", type=float, default=None, help="default: the recipe's (classifier-free: 2)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                        help="sampler:eta rows to measure (ddpm is the slow 1000-step row)")
    parser.add_argument("--digits-only", action="store_true", help="only the --digit check")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    loaded = load_network(resolve_checkpoint(args.checkpoint, RuntimeConfig().ckpt_dir))
    base = SampleConfig(guide_checkpoint="none", guidance=args.guidance)  # these tables use classifier-free guidance
    clf = load_classifier(Path(args.classifier))
    reference, floor_images, train = real_sets(DataConfig(data_root=args.data_root), args.n)
    floor = scorecard(clf, floor_images, reference, train)
    rows = []
    print(f"checkpoint {loaded.path}, N = {args.n}; real-data floor FD {floor['fd']:.2f}\n")
    print("| sampler | eta | steps | FD (N=%d) | precision | recall | confidence | s / 16 digits |" % args.n)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sampler, eta, steps in [] if args.digits_only else grid(args.families):
        asked = base.replace(sampler=sampler, sample_steps=None if sampler == "ddpm" else steps, eta=eta)
        images, _ = draw(loaded, asked, args.n)
        card = scorecard(clf, images, reference, train)
        card.update(sampler=sampler, eta=eta, steps=steps, seconds_16=draw(loaded, asked, 16)[1])
        rows.append(card)
        print(f"| {sampler} | {eta:g} | {steps} | {card['fd']:.2f} | {card['precision']:.3f} | {card['recall']:.3f} | "
              f"{card['confidence']:.3f} | {card['seconds_16']:.2f} |", flush=True)
    hits = []
    for d in range(loaded.config.num_classes):
        images, _ = draw(loaded, base, args.per_digit, digit=d)
        hits.append(scorecard(clf, images, reference[: args.per_digit], train, digit=d)["digit_accuracy"])
    print("\n--digit d with the default recipe under classifier-free guidance: fraction classified as d = "
          + ", ".join(f"{d}: {h:.2f}" for d, h in enumerate(hits)) + f"; mean {sum(hits) / len(hits):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"floor": floor, "rows": rows, "digit_accuracy": hits}, indent=2))


if __name__ == "__main__":
    main()
