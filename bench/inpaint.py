"""How well does inpainting complete a digit? Hide the bottom (or right) half of N test digits, let the model
fill it in, and ask the scorecard's classifier whether the result is still the original digit.

    python bench/inpaint.py --data-root DIR --n 1000 --picture docs/inpainting.png

Rows of the table: the classifier on the masked image alone (the baseline: what the kept half already
tells), the completion without a label (the model must guess the digit from the kept half), and the
completion guided towards the true label. Sampling settings are the defaults of python -m diffusion.sampling
(override with the same flags after --, e.g. -- --resample 1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from diffusion.checkpoint import resolve_checkpoint
from diffusion.classifier import DEFAULT_PATH, accuracy, load_classifier
from diffusion.config import Config, build_parser, config_overrides
from diffusion.dataloader import load_images, to_uint8, to_unit_range
from diffusion.generation import generate, load_for_sampling, load_guide, settings_for_guide
from diffusion.uploads import region_keep
from diffusion.visuals import save_grid


def complete(net, cfg, device, digits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor | None,
             weak=None, overrides: dict | None = None) -> torch.Tensor:
    """Completions as `python -m diffusion.sampling --inpaint` makes them, guide settings included."""
    cfg = settings_for_guide(cfg, overrides or {}, weak is not None, labelled=labels is not None)
    known = to_unit_range(digits)
    return to_uint8(generate(net, cfg, len(digits), labels, device, seed=cfg.seed, known=known, keep=keep,
                             weak=weak)).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--checkpoint", default=None, help="checkpoint or exported folder (default: the latest)")
    parser.add_argument("--n", type=int, default=1000, help="test digits to complete per region")
    parser.add_argument("--regions", nargs="+", default=["bottom", "right"], help="halves to hide")
    parser.add_argument("--classifier", default=str(DEFAULT_PATH), help="the scorecard's classifier")
    parser.add_argument("--picture", default=None, help="write masked / completed / original rows here (PNG)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("sampling_flags", nargs="*", help="python -m diffusion.sampling flags, after --")
    args = parser.parse_args()
    overrides = config_overrides(build_parser("sampling", "").parse_args(args.sampling_flags))
    path = resolve_checkpoint(args.checkpoint, Config().ckpt_dir)
    net, cfg, device = load_for_sampling(path, overrides)
    weak, guide_line = load_guide(path, cfg, device)
    test, labels = load_images(dataclasses.replace(Config(), data_root=args.data_root), train=False)
    digits, labels = test[: args.n], labels[: args.n]
    classifier = load_classifier(Path(args.classifier))
    results = {"checkpoint": str(path), "n": len(digits), "resample": cfg.resample, "steps": cfg.sample_steps or "auto",
               "sampler": cfg.sampler, "eta": min(cfg.eta, 1.0), "guide": guide_line, "regions": {}}
    pictures = []
    for region in args.regions:
        keep = region_keep(region, cfg.image_size)
        masked = torch.where(keep, digits, torch.zeros_like(digits))  # hidden pixels are background
        row = {"masked image alone": accuracy(classifier, masked, labels)}
        for name, guide in (("completed, no label", None), (f"completed, guided to the true label (w = {cfg.guidance:g})", labels)):
            start = time.perf_counter()
            filled = complete(net, cfg, device, digits, keep, None if guide is None else guide.to(device), weak,
                              overrides)
            row[name] = accuracy(classifier, filled, labels)
            row[name + " seconds"] = round(time.perf_counter() - start, 1)
            if guide is None:
                unguided = filled
            print(f"{region}: {name}: {row[name]:.3f} ({row[name + ' seconds']} s)", flush=True)
        row["original"] = accuracy(classifier, digits, labels)
        results["regions"][region] = row
        print(f"{region}: masked alone {row['masked image alone']:.3f}, original {row['original']:.3f}", flush=True)
        pictures += [masked[:10], unguided[:10], filled[:10], digits[:10]]
    if args.picture:
        save_grid(to_unit_range(torch.cat(pictures)), Path(args.picture), nrow=10)
        print(f"wrote {args.picture}: per region, rows masked / no label / guided / original")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
