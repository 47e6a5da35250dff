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
import json
import time
from pathlib import Path

import torch

from diffusion.checkpoint import load_network, resolve_checkpoint
from diffusion.cli import build_parser, parse
from diffusion.config import DataConfig, RuntimeConfig, SampleConfig
from diffusion.dataloader import load_images, to_uint8, to_unit_range
from diffusion.digit_classifier import DEFAULT_PATH, accuracy, load_classifier
from diffusion.generation import generate, prepare
from diffusion.uploads import region_keep
from diffusion.visuals import save_grid


def complete(loaded, asked, runtime_cfg, digits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor | None):
    """Completions as `python -m diffusion.sampling --inpaint` makes them: the same recipe, guide and seed."""
    recipe, weak, runtime = prepare(loaded, asked, runtime_cfg, task="inpaint", labelled=labels is not None,
                                    n=len(digits), verbose=False)
    x = generate(loaded.net, loaded.config, recipe, len(digits), labels, runtime, seed=runtime_cfg.seed, weak=weak,
                 known=to_unit_range(digits), keep=keep)
    return to_uint8(x).cpu(), recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DataConfig().data_root)
    parser.add_argument("--checkpoint", default=None, help="default: the latest in diffusion/checkpoints")
    parser.add_argument("--n", type=int, default=1000, help="test digits to complete")
    parser.add_argument("--regions", nargs="+", default=["bottom", "right"])
    parser.add_argument("--classifier", default=str(DEFAULT_PATH), help="the scorecard's classifier")
    parser.add_argument("--picture", default=None, help="write masked / completed / original rows here (PNG)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("sampling_flags", nargs="*", help="python -m diffusion.sampling flags, after --")
    args = parser.parse_args()
    _, configs = parse(build_parser("sampling", "", SampleConfig, RuntimeConfig), args.sampling_flags)
    asked, runtime_cfg = configs[SampleConfig], configs[RuntimeConfig]
    loaded = load_network(resolve_checkpoint(args.checkpoint, runtime_cfg.ckpt_dir))
    test, labels = load_images(DataConfig(data_root=args.data_root), train=False)
    digits, labels = test[: args.n], labels[: args.n]
    classifier = load_classifier(Path(args.classifier))
    results = {"checkpoint": str(loaded.path), "n": len(digits), "regions": {}}
    pictures = []
    for region in args.regions:
        keep = region_keep(region, loaded.config.image_size)
        masked = torch.where(keep, digits, torch.zeros_like(digits))  # hidden pixels are background
        row = {"masked image alone": accuracy(classifier, masked, labels)}
        for name, guide in (("completed, no label", None), ("completed, guided to the true label", labels)):
            start = time.perf_counter()
            filled, recipe = complete(loaded, asked, runtime_cfg, digits, keep, guide)
            results.setdefault("recipes", {})[name] = str(recipe)
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
