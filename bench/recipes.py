"""Which recipe gives the best digits for the same training time? Train each recipe with several seeds, score
each with the scorecard, print a table of the mean and the per-seed values.

    python bench/recipes.py --data-root DIR --seeds 0 1 --recipes default min-snr ema-0.995
    python bench/recipes.py --data-root DIR --seeds 0 1 --recipes default interval eta-0   # sampling only

A recipe is training flags plus sampling flags (RECIPES below). Recipes with the same training flags share
their training runs: sampling levers are scored on the same networks. Every training lever here costs the
same per step, so equal steps (the default run's epochs) is equal wall-clock time. Trained networks are kept
in OUT/train-<flags>-seed<S>, scores in OUT/scores.json, so a rerun only does what is missing.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from diffusion.config import TrainConfig

from scorecard import run, scorecard  # bench/scorecard.py, beside this script

OLD = ["--guidance-interval", "0", "2"]  # the default interval when the training levers were scored
# the sampling defaults before autoguidance: classifier-free guidance w 2 at 0.15 < sigma <= 2, dpmpp-10 with eta 1
BEFORE = ["--guide-checkpoint", "none", "--guidance", "2", "--eta", "1"]

EARLIER = {  # name: (training flags, sampling flags), scored on top of BEFORE
    "previous-default": ([], []),
    "no-interval": ([], ["--guidance-interval", "0", "inf"]),  # guidance at every noise level: the earlier default
    "no-interval-eta-0": ([], ["--guidance-interval", "0", "inf", "--eta", "0"]),
    "no-interval-w-1.25": ([], ["--guidance-interval", "0", "inf", "--guidance", "1.25"]),
    "no-interval-w-1.5": ([], ["--guidance-interval", "0", "inf", "--guidance", "1.5"]),
    "w-1": ([], ["--guidance", "1"]),  # the conditional model, no guidance
    "w-1-eta-0": ([], ["--guidance", "1", "--eta", "0"]),
    "interval": ([], ["--guidance-interval", "0", "5"]),
    "interval-eta-0": ([], ["--guidance-interval", "0", "5", "--eta", "0"]),
    "interval-w-3": ([], ["--guidance-interval", "0", "5", "--guidance", "3"]),
    "interval-0.3-5": ([], ["--guidance-interval", "0.3", "5"]),
    "interval-0-2": ([], ["--guidance-interval", "0", "2"]),
    "interval-0-1": ([], ["--guidance-interval", "0", "1"]),
    "interval-0-2-w-3": ([], ["--guidance-interval", "0", "2", "--guidance", "3"]),
    "interval-0-1-w-3": ([], ["--guidance-interval", "0", "1", "--guidance", "3"]),
    "unconditional": ([], ["--unconditional", "--steps", "10"]),  # 10: the unconditional default before auto steps
    "unconditional-eta-0": ([], ["--unconditional", "--steps", "10", "--eta", "0"]),
    "min-snr": (["--min-snr-gamma", "5"], OLD),
    "ema-0.995": (["--ema-decay", "0.995"], OLD),
    "p-uncond-0.2": (["--p-uncond", "0.2"], OLD),
    "p-uncond-0.2-unconditional": (["--p-uncond", "0.2"], ["--unconditional", "--steps", "10"]),
    "lr-4e-3": (["--lr", "4e-3"], OLD),
    "warmup-50": (["--warmup-steps", "50"], OLD),
    "interval-0.05-2": ([], ["--guidance-interval", "0.05", "2"]),  # skip guiding the last two, nearly clean steps
    "interval-0.15-2": ([], ["--guidance-interval", "0.15", "2"]),
    "interval-0.5-2": ([], ["--guidance-interval", "0.5", "2"]),
    "steps-15": ([], [*OLD, "--steps", "15"]),  # more solver steps: 1.5x the sampling time
    "steps-20": ([], [*OLD, "--steps", "20"]),
    "ema-0.98": (["--ema-decay", "0.98"], OLD),  # acts after ~440 steps, where the warm-up passes 0.98
    "batch-64": (["--batch-size", "64"], OLD),  # twice the steps for the same images (and about the same time)
    "batch-64-unconditional": (["--batch-size", "64"], ["--unconditional", "--steps", "10"]),
    "batch-64-w-1": (["--batch-size", "64"], ["--guidance", "1"]),
    "label-free": (["--num-classes", "0"], ["--steps", "10"]),  # an unconditional model: every image trains it
    "label-free-steps-20": (["--num-classes", "0"], ["--steps", "20"]),  # the auto steps without labels
    "label-free-steps-50": (["--num-classes", "0"], ["--steps", "50"]),
    "label-free-eta-0": (["--num-classes", "0"], ["--steps", "10", "--eta", "0"]),
    "unconditional-auto": ([], ["--unconditional"]),  # the default network's null label, auto steps (20)
    "eta-2": ([], ["--eta", "2"]),  # more fresh noise per dpmpp step than the reverse SDE's (eta 1)
    "eta-2.5": ([], ["--eta", "2.5"]),
    "eta-3": ([], ["--eta", "3"]),
    "eta-4": ([], ["--eta", "4"]),
    "eta-3-w-1.5": ([], ["--eta", "3", "--guidance", "1.5"]),
    "eta-3-w-1.75": ([], ["--eta", "3", "--guidance", "1.75"]),
    "eta-3-w-1": ([], ["--eta", "3", "--guidance", "1"]),
    "eta-3-interval-0.5-2": ([], ["--eta", "3", "--guidance-interval", "0.5", "2"]),
}
RECIPES = {name: (train, BEFORE + sample) for name, (train, sample) in EARLIER.items()}
RECIPES.update({  # the current sampling defaults: autoguidance by the half-epochs checkpoint, w 2.5, dpmpp-10 with eta 3
    "default": ([], []),
    "autoguidance-w-2": ([], ["--guidance", "2"]),
    "autoguidance-w-3": ([], ["--guidance", "3"]),
    "autoguidance-eta-1": ([], ["--eta", "1"]),
    "autoguidance-eta-1-w-2": ([], ["--eta", "1", "--guidance", "2"]),
    "cfg-w-2.5": ([], ["--guide-checkpoint", "none", "--guidance", "2.5", "--eta", "3"]),  # the defaults, without it
    # without labels: autoguided at every noise level, w 2, eta 1, 20 steps (generation.settings_for_guide)
    "unconditional-autoguided": ([], ["--unconditional"]),
    "label-free-autoguided": (["--num-classes", "0"], []),
})


def trained(train_flags: list[str], seed: int, args) -> Path:
    folder = Path(args.out) / ("train-" + ("_".join(f.strip("-") for f in train_flags) or "default") + f"-seed{seed}")
    if args.default_ckpt_dir and not train_flags and seed == 0:
        return Path(args.default_ckpt_dir)  # the default run already on disk
    if not (folder / f"epoch_{args.epochs:03d}.pth").exists():
        print(f"training {folder.name} ...", flush=True)
        run(["diffusion.main", "--data-root", args.data_root, "--ckpt-dir", str(folder), "--out-dir",
             str(folder / "outputs"), "--seed", str(seed), "--epochs", str(args.epochs), "--save-every", "0",
             *train_flags])
    return folder


def score(name: str, seed: int, args, scores: dict) -> dict:
    key = f"{name}/seed{seed}/n{args.n}"
    if key not in scores:
        train_flags, sample_flags = RECIPES[name]
        folder = trained(train_flags, seed, args)
        scores[key] = scorecard("--data-root", args.data_root, "--ckpt-dir", str(folder), "--n", str(args.n),
                                "--seed", str(seed), *sample_flags)
        (Path(args.out) / "scores.json").write_text(json.dumps(scores, indent=1))
    s = scores[key]["samples"]
    print(f"{name:16s} seed {seed}: FD {s['fd']:6.1f}  precision {s['precision']:.3f}  recall {s['recall']:.3f}",
          flush=True)
    return scores[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="recipes to score")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training and sampling seeds")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs,
                        help="training length of every recipe (equal steps; default: the default run's)")
    parser.add_argument("--n", type=int, default=1000, help="samples scored per run")
    parser.add_argument("--out", default="bench/results/recipes", help="trained networks and scores")
    parser.add_argument("--default-ckpt-dir", default=None,
                        help="use this folder as the default recipe's seed-0 run instead of training it again")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "scores.json"
    scores = json.loads(path.read_text()) if path.exists() else {}
    rows = []
    for name in args.recipes:
        per_seed = [score(name, seed, args, scores)["samples"] for seed in args.seeds]
        mean = {k: statistics.fmean(s[k] for s in per_seed) for k in ("fd", "precision", "recall")}
        rows.append((name, mean, per_seed))
    floor = scores[f"{args.recipes[0]}/seed{args.seeds[0]}/n{args.n}"]["real_floor"]
    print(f"\n| recipe | training flags | sampling flags | FD | precision | recall | per seed (FD / recall) |\n"
          f"| --- | --- | --- | --- | --- | --- | --- |\n"
          f"| real digits (floor) | | | {floor['fd']:.1f} | {floor['precision']:.3f} | {floor['recall']:.3f} | |")
    for name, mean, per_seed in rows:
        train_flags, sample_flags = RECIPES[name]
        seeds = ", ".join(f"{s['fd']:.1f} / {s['recall']:.3f}" for s in per_seed)
        print(f"| {name} | `{' '.join(train_flags)}` | `{' '.join(sample_flags)}` | {mean['fd']:.1f} | "
              f"{mean['precision']:.3f} | {mean['recall']:.3f} | {seeds} |")


if __name__ == "__main__":
    main()
