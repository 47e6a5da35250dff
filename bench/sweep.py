"""Which sampling setting draws the best digits from networks already trained? Score each setting on every run,
each with several sampling seeds, with the scorecard of diffusion.evaluate, and print the means.

    python -m diffusion.main --seed 0 --ckpt-dir runs/0        # and --seed 1 ...
    python bench/sweep.py --data-root DIR --runs runs/0 runs/1 --sampling-seeds 2 \
        --settings "" "--guidance 2" "--guidance 2.25"

Run k is scored with sampling seeds k, k + 100, ... (the first is what `evaluate --seed k` scores), so every
setting sees the same noise: the differences between settings are not sampling noise. A setting is a string of
evaluate's flags; "" is the default recipe, and {run} stands for each run's folder (e.g. "--guide-checkpoint
{run}/epoch_003.pth"). With two or more sampling seeds the last column is the spread of one
score: the standard deviation over sampling seeds of the same network, pooled over the runs.
"""
from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

from scorecard import scorecard  # bench/scorecard.py, beside this script

KEYS = ("fd", "precision", "recall")


def score(run: Path, seed: int, flags: list[str], args) -> dict:
    return scorecard("--data-root", args.data_root, "--ckpt-dir", str(run), "--n", str(args.n), "--seed", str(seed),
                     *flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--runs", nargs="+", required=True, help="checkpoint folders; run k is scored with seed k")
    parser.add_argument("--settings", nargs="+", default=[""], help="evaluate flags per setting, one string each")
    parser.add_argument("--sampling-seeds", type=int, default=1, help="sampling seeds per run and setting")
    parser.add_argument("--n", type=int, default=1000, help="samples scored per run, seed and setting")
    args = parser.parse_args()
    print("| setting | FD | precision | recall | per run, mean over its seeds (FD / precision / recall) "
          "| spread of one score |\n| --- | --- | --- | --- | --- | --- |")
    for setting in args.settings:
        per_run, variance = [], {key: [] for key in KEYS}
        for k, run in enumerate(map(Path, args.runs)):
            flags = shlex.split(setting.replace("{run}", str(run)))
            cards = [score(run, k + 100 * i, flags, args)["samples"] for i in range(args.sampling_seeds)]
            per_run.append({key: statistics.fmean(c[key] for c in cards) for key in KEYS})
            for key in KEYS:
                variance[key].append(statistics.variance([c[key] for c in cards]) if len(cards) > 1 else 0.0)
        mean = {key: statistics.fmean(r[key] for r in per_run) for key in KEYS}
        sd = {key: statistics.fmean(v) ** 0.5 for key, v in variance.items()}
        each = ", ".join(f"{r['fd']:.1f} / {r['precision']:.3f} / {r['recall']:.3f}" for r in per_run)
        spread = f"{sd['fd']:.1f} / {sd['precision']:.3f} / {sd['recall']:.3f}" if args.sampling_seeds > 1 else ""
        print(f"| {setting or 'the default'} | {mean['fd']:.1f} | {mean['precision']:.3f} | {mean['recall']:.3f} "
              f"| {each} | {spread} |", flush=True)


if __name__ == "__main__":
    main()
