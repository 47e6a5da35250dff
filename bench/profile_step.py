"""Where a training step's time goes: torch.profiler's top operators for the default configuration.

    python bench/profile_step.py --data-root ../shared/data
"""
from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from diffusion.config import DataConfig
from diffusion.dataloader import to_unit_range
from diffusion.train import TrainingRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DataConfig().data_root)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    from diffusion.main import parse_run
    run = TrainingRun(parse_run(["--data-root", args.data_root, "--limit-train", "1024"])[1])
    x0, y = to_unit_range(run.images[:128]), run.labels[:128]
    for _ in range(3):
        run.train_step(x0, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            run.train_step(x0, y)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=40))


if __name__ == "__main__":
    main()
