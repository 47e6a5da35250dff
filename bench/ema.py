"""Which EMA length draws the best digits? Score every EMA a run kept (`main --ema-lengths 0.05 0.1 ...`) with the
scorecard after training, over several seeds, beside the EMA that sampling uses by default.

    python -m diffusion.main --seed 0 --ema-lengths 0.03 0.05 0.1 0.2 --ckpt-dir runs/s0   # and --seed 1 ...
    python bench/ema.py --data-root DIR --runs runs/s0 runs/s1
    python bench/ema.py --data-root DIR --runs runs/s0 runs/s1 --guide-only   # each EMA for the guide alone

Run k is scored with sampling seed k. For each EMA, every epoch checkpoint of the run gets it in a scratch folder,
so autoguidance's guide (the earlier epoch) averages its weights the same way as the network it guides; with
--guide-only the last checkpoint keeps the default EMA and only the guide changes.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from diffusion.checkpoint import load_checkpoint

from scorecard import scorecard  # bench/scorecard.py, beside this script

DEFAULT = "default"  # the EMA that sampling uses: --ema-decay with its warm-up


def with_ema(run: Path, track: str, folder: Path, guide_only: bool = False) -> Path:
    """Copy the run's epoch checkpoints into `folder` with the EMA named `track` as the one sampling uses (all
    but the last with guide_only); the copy of the last one."""
    paths = sorted(run.glob("epoch_*.pth"))
    for path in paths:
        state = load_checkpoint(path)
        if track != DEFAULT and not (guide_only and path == paths[-1]):
            state["ema"] = state["ema_tracks"][track]
        torch.save(state, folder / path.name)
    return folder / path.name


def score(run: Path, track: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        last = with_ema(run, track, Path(scratch), args.guide_only)
        return scorecard("--data-root", args.data_root, "--checkpoint", str(last), "--n", str(args.n),
                         "--seed", str(seed), *args.sampling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--runs", nargs="+", required=True, help="checkpoint folders of runs with --ema-lengths")
    parser.add_argument("--n", type=int, default=1000, help="samples scored per run and EMA")
    parser.add_argument("--guide-only", action="store_true",
                        help="give each EMA to the guide only; the network it guides keeps the default EMA")
    parser.add_argument("--sampling", nargs=argparse.REMAINDER, default=[], help="sampling flags for evaluate")
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs]
    latest = max(runs[0].glob("epoch_*.pth"))
    tracks = [DEFAULT, *load_checkpoint(latest)["ema_tracks"]]
    print("| EMA | FD | precision | recall | per run (FD / precision / recall) |\n| --- | --- | --- | --- | --- |")
    for track in tracks:
        scores = [score(run, track, seed, args) for seed, run in enumerate(runs)]
        samples = [s["samples"] for s in scores]
        mean = {k: statistics.fmean(s[k] for s in samples) for k in ("fd", "precision", "recall")}
        each = ", ".join(f"{s['fd']:.1f} / {s['precision']:.3f} / {s['recall']:.3f}" for s in samples)
        name = "--ema-decay (default)" if track == DEFAULT else f"sigma_rel {track}{' (guide)' * args.guide_only}"
        print(f"| {name} | {mean['fd']:.1f} | {mean['precision']:.3f} | {mean['recall']:.3f} | {each} |", flush=True)
    floor = scores[0]["real_floor"]
    print(f"| real digits | {floor['fd']:.1f} | {floor['precision']:.3f} | {floor['recall']:.3f} | |")


if __name__ == "__main__":
    main()
