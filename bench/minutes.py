"""How long should I train? Train the default recipe for several time budgets (`--minutes`), score each
final model with the scorecard at one N, and plot FD and recall against minutes with the real floor.

    python bench/minutes.py --data-root DIR --minutes 2 5 10

Each budget is a separate `python -m diffusion.main --minutes M` run (its own checkpoint folder under
--out; a budget whose final.pth is already there is not trained again), then `python -m diffusion.evaluate
--json` with the current sampling defaults (a score is kept in the budget's score.json and reused while
the network and those defaults are unchanged). Results go to OUT/minutes.json and the plot to
OUT/minutes.png (or --plot). Needs the scorecard's classifier (`python -m diffusion.classifier`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion.checkpoint import load_checkpoint
from diffusion.config import SampleConfig

from scorecard import run, scorecard  # bench/scorecard.py, beside this script


def train_and_score(minutes: float, args) -> dict:
    folder = Path(args.out) / f"{minutes:g}min"
    if not (folder / "final.pth").exists():  # a budget already trained is only scored again
        run(["diffusion.main", "--data-root", args.data_root, "--minutes", str(minutes), "--ckpt-dir", str(folder),
             "--out-dir", str(folder / "outputs"), *args.train_args])
    cache = folder / "score.json"  # reused while the network and the sampling defaults it was scored with hold
    key = {"n": args.n, "sampling": sampling_defaults(), "trained": (folder / "final.pth").stat().st_mtime}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        scores = cached["scores"]
    else:
        scores = scorecard("--data-root", args.data_root, "--ckpt-dir", str(folder), "--n", str(args.n))
        cache.write_text(json.dumps({"key": key, "scores": scores}))
    row = {"minutes": minutes, "steps": load_checkpoint(folder / "final.pth")["step"], **scores}
    print(f"{minutes:g} min, {row['steps']} steps: FD {row['samples']['fd']:.1f} (floor {row['real_floor']['fd']:.1f}), "
          f"precision {row['samples']['precision']:.3f}, recall {row['samples']['recall']:.3f}", flush=True)
    return row


def sampling_defaults() -> dict:
    """The sampling settings evaluate uses when given none: a score is only reused while these hold."""
    from diffusion import recipe
    return {**{k: str(v) for k, v in SampleConfig().to_dict().items()},
            **{name: str(getattr(recipe, name)) for name in ("AUTOGUIDED", "CLASSIFIER_FREE", "AUTOGUIDED_UNLABELLED")}}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minutes"] for r in rows]
    fig, (ax_fd, ax_rec) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    ax_fd.plot(minutes, [r["samples"]["fd"] for r in rows], "o-", label="default recipe")
    ax_fd.axhline(rows[0]["real_floor"]["fd"], color="gray", ls="--", label="real digits (floor)")
    ax_fd.set(xlabel="training minutes", ylabel=f"FD (N = {rows[0]['samples']['n']})", ylim=(0, None))
    ax_rec.plot(minutes, [r["samples"]["recall"] for r in rows], "o-", label="recall")
    ax_rec.plot(minutes, [r["samples"]["precision"] for r in rows], "s-", label="precision")
    ax_rec.axhline(rows[0]["real_floor"]["recall"], color="gray", ls="--", label="real recall")
    ax_rec.set(xlabel="training minutes", ylim=(0, 1))
    for ax in (ax_fd, ax_rec):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding MNIST/raw")
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 10, 15, 30], help="budgets to train")
    parser.add_argument("--n", type=int, default=1000, help="samples scored per budget")
    parser.add_argument("--out", default="bench/results/minutes", help="checkpoints, scores and plot")
    parser.add_argument("--plot", default=None, help="where to write the plot (default: OUT/minutes.png)")
    parser.add_argument("train_args", nargs="*", help="extra flags for diffusion.main, after --")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = [train_and_score(m, args) for m in sorted(args.minutes)]
    (Path(args.out) / "minutes.json").write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.plot or Path(args.out) / "minutes.png"))


if __name__ == "__main__":
    main()
