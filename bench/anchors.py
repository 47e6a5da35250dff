"""Quality per CPU-minute: this project's U-Net against diffusers' and lucidrains' U-Nets, each trained for the
same wall-clock budget the same way, then sampled the same way and scored by the project's scorecard at one N.
Not a test: run it on an idle machine (each system trains in its own process, one after the other).

    pip install -e ".[bench]"
    python -m diffusion.classifier --data-root ../shared/data           # the scorecard's classifier, once
    python bench/anchors.py --data-root ../shared/data --minutes 15 --n 500
    python bench/anchors.py --data-root ../shared/data --n 500 --rescore --samplers ddim-50:1   # more rows, no training
    python bench/anchors.py --data-root ../shared/data --eps-error    # test-set noise error of the saved weights

"The same way" means the product's own training step for every network (L_simple, linear schedule, T = 1000,
AdamW 2e-3, 200 warm-up steps then cosine to zero at the end of the budget, gradient clipping, EMA 0.999,
batch 128, same data order), so only the network and its speed differ. diffusers' UNet2DModel takes class
labels (num_class_embeds), so it is trained with classifier-free guidance exactly like ours; lucidrains' Unet
has no label input and is trained unconditionally. Every system is scored unconditionally; the guided
systems are also scored with guidance w = 2 and balanced labels (what `python -m diffusion.sampling` uses with classifier-free guidance).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion.config import DataConfig, RunConfig, SampleConfig
from diffusion.dataloader import to_unit_range
from diffusion.errors import UserError
from diffusion.main import parse_run
from diffusion.train import StopFlag, TrainingRun, train_one_epoch


def parse_sampler_spec(spec: str) -> dict:
    """'dpmpp-20' -> sampler dpmpp, 20 steps, eta 0; 'dpmpp-20:1' -> eta 1: SampleConfig's fields."""
    name_steps, _, eta = spec.partition(":")
    name, _, steps = name_steps.partition("-")
    try:
        return {"sampler": name, "sample_steps": int(steps), "eta": float(eta or 0)}
    except ValueError:
        raise UserError(f"a sampler is written NAME-STEPS[:ETA], like dpmpp-20 or ddim-50:1; got {spec!r}") from None

SYSTEMS = ("ours", "diffusers", "lucidrains")
DESCRIPTION = {
    "ours": "ours: default U-Net (2x2 patches, 32/32 at 14/7, 1 block, attention at 7x7)",
    "diffusers": "diffusers UNet2DModel (32,64,64), no attention, class embedding",
    "lucidrains": "lucidrains Unet(dim=32, dim_mults=(1,2,4)), unconditional",
}


class DiffusersNet(torch.nn.Module):
    """UNet2DModel behind this project's (x, t, labels) -> eps interface, on 28x28 (two downsamplings: 28/14/7)."""

    def __init__(self, num_classes: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                                down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                                num_class_embeds=num_classes + 1)  # + the "no label" class

    def forward(self, x, t, labels=None):
        return self.unet(x, t, class_labels=labels).sample


class LucidrainsNet(torch.nn.Module):
    """denoising-diffusion-pytorch's Unet (no label input) behind the same interface."""

    def __init__(self):
        super().__init__()
        from denoising_diffusion_pytorch import Unet

        self.unet = Unet(dim=32, dim_mults=(1, 2, 4), channels=1)

    def forward(self, x, t, labels=None):
        return self.unet(x, t)


def make_run(system: str, cfg: RunConfig) -> TrainingRun:
    """The product's TrainingRun, with the anchor's network in place of the U-Net."""
    if system == "ours":
        return TrainingRun(cfg)
    cfg = cfg.replace(runtime=cfg.runtime.replace(memory_format="contiguous"),
                      model=cfg.model.replace(num_classes=0 if system == "lucidrains" else cfg.model.num_classes))
    torch.manual_seed(cfg.runtime.seed)
    return TrainingRun(cfg, model=DiffusersNet(cfg.model.num_classes) if system == "diffusers" else LucidrainsNet())


def train_for(run: TrainingRun) -> dict:
    """Train with the product's epoch loop until run.cfg.minutes are spent (the product's --minutes: warm-up,
    then a cosine in training time reaching zero at the budget)."""
    stop, t0 = StopFlag(), time.perf_counter()
    try:
        while train_one_epoch(run, stop) == "done":
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    finally:
        stop.restore()
    elapsed = time.perf_counter() - t0
    return {"steps": run.step, "seconds": round(elapsed, 1),
            "images_per_s": round(run.step * run.cfg.train.batch_size / elapsed, 1),
            "params": sum(p.numel() for p in run.model.parameters()), "loss_curve": run.curve}


def score(run: TrainingRun, args) -> list[dict]:
    from diffusion.checkpoint import Loaded
    from diffusion.dataloader import to_uint8
    from diffusion.digit_classifier import load_classifier
    from diffusion.generation import generate, prepare, sample_labels
    from diffusion.metrics import real_sets, scorecard
    from diffusion.visuals import save_grid

    clf = load_classifier(Path(args.classifier))
    reference, floor_images, train = real_sets(run.cfg.data, args.n)
    loaded, rows = Loaded(run.ema.module.eval(), run.cfg.model, Path(args.out), None), []
    modes = ["guided", "unconditional"] if run.cfg.model.num_classes else ["unconditional"]
    for sampler in args.samplers:
        asked = SampleConfig(**parse_sampler_spec(sampler), guidance=2.0, guide_checkpoint="none")
        for mode in modes:
            t0 = time.perf_counter()
            labels = sample_labels(run.cfg.model, args.n, unconditional=mode == "unconditional")
            recipe, _, runtime = prepare(loaded, asked, run.cfg.runtime, task="sample", labelled=labels is not None,
                                         n=args.n, verbose=False)
            with torch.inference_mode():
                images = to_uint8(generate(loaded.net, run.cfg.model, recipe, args.n, labels, runtime)).cpu()
            card = scorecard(clf, images, reference, train)
            card.update(sampler=sampler, mode=mode, sample_seconds=round(time.perf_counter() - t0, 1))
            rows.append(card)
            print(f"{args.only} {sampler} {mode}: FD {card['fd']:.1f}, precision {card['precision']:.3f}, "
                  f"recall {card['recall']:.3f}", flush=True)
            grid = Path(args.out) / f"{args.only}_{sampler.replace(':', '_eta')}_{mode}.png"
            save_grid(to_unit_range(images[:64]), grid, nrow=8)
    rows.append({"mode": "floor", **scorecard(clf, floor_images, reference, train)})
    return rows


def run_one(args) -> None:
    torch.manual_seed(0)
    _, cfg = parse_run(["--data-root", args.data_root, "--ckpt-dir", str(Path(args.out) / args.only),
                        "--minutes", str(args.minutes)])
    run = make_run(args.only, cfg)
    weights, report = Path(args.out) / f"{args.only}_ema.pth", Path(args.out) / f"{args.only}.json"
    if args.rescore:  # new sampler rows for the weights trained earlier; other rows are kept
        result = json.loads(report.read_text())
        run.ema.module.load_state_dict(torch.load(weights, weights_only=True))
        result["scores"] = [r for r in result["scores"] if r["mode"] != "floor" and r["sampler"] not in args.samplers]
    else:
        result = {"system": args.only, "description": DESCRIPTION[args.only], **train_for(run),
                  "scores": []}
        torch.save(run.ema.module.state_dict(), weights)
    result["scores"] += score(run, args)
    report.write_text(json.dumps(result, indent=1))


@torch.no_grad()
def eps_error(args, timesteps=(999, 900, 500, 200, 50, 5), n: int = 500) -> None:
    """Test-set mean squared error of each saved EMA's noise prediction at a few t (same x0, noise and labels)."""
    from diffusion.dataloader import load_images
    from diffusion.diffusion_utils import q_sample

    _, cfg = parse_run(["--data-root", args.data_root])
    images, labels = load_images(cfg.data, train=False)
    x0, y = to_unit_range(images[:n]), labels[:n]
    print("\n| system | " + " | ".join(f"t = {t}" for t in timesteps) + " |\n|" + " --- |" * (len(timesteps) + 1))
    for system in args.systems:
        run = make_run(system, cfg.replace(data=cfg.data.replace(limit_train=cfg.train.batch_size)))
        net = run.ema.module.eval()
        net.load_state_dict(torch.load(Path(args.out) / f"{system}_ema.pth", weights_only=True))
        g, errors = torch.Generator().manual_seed(0), []
        for t in timesteps:
            tt, eps = torch.full((n,), t), torch.randn(x0.shape, generator=g)
            errors.append(((net(q_sample(x0, tt, eps, run.schedule), tt, y) - eps) ** 2).mean().item())
        print(f"| {system} | " + " | ".join(f"{e:.4f}" for e in errors) + " |")


def print_table(out: Path, systems) -> None:
    results = [json.loads((out / f"{s}.json").read_text()) for s in systems if (out / f"{s}.json").exists()]
    if not results:
        return
    floor = next(r for r in results[0]["scores"] if r["mode"] == "floor")
    print(f"\nN = {floor['n']}; real-data floor FD {floor['fd']:.1f}, "
          f"precision {floor['precision']:.3f}, recall {floor['recall']:.3f}\n")
    print("| system | params | train img/s | steps in budget | sampler | labels | FD | precision | recall | "
          "confidence | KL(classes) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        for s in r["scores"]:
            if s["mode"] == "floor":
                continue
            spec = parse_sampler_spec(s["sampler"])
            name, steps, eta = spec["sampler"], spec["sample_steps"], spec["eta"]
            print(f"| {r['description']} | {r['params'] / 1e6:.2f} M | {r['images_per_s']:.0f} | {r['steps']} | "
                  f"{name}-{steps}{f', eta {eta:g}' if eta else ''} | {'w = 2' if s['mode'] == 'guided' else 'none'} | {s['fd']:.1f} | "
                  f"{s['precision']:.3f} | {s['recall']:.3f} | {s['confidence']:.3f} | {s['class_kl_uniform']:.3f} |")


def main() -> None:
    from diffusion.digit_classifier import DEFAULT_PATH

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DataConfig().data_root)
    parser.add_argument("--classifier", default=str(DEFAULT_PATH))
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per system (wall clock)")
    parser.add_argument("--n", type=int, default=1000, help="samples per scored row (same N for every row)")
    parser.add_argument("--samplers", nargs="+", default=["dpmpp-20", "ddim-100", "dpmpp-20:1"],
                        help="NAME-STEPS[:ETA], e.g. dpmpp-20, or dpmpp-20:1 for the stochastic variant")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", default="bench/results/anchors", help="checkpoints, grids and JSON go here")
    parser.add_argument("--table", action="store_true", help="only print the table from earlier results")
    parser.add_argument("--rescore", action="store_true", help="score saved weights with --samplers, no training")
    parser.add_argument("--eps-error", action="store_true", help="noise-prediction error of saved weights against t")
    parser.add_argument("--only", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.only:
        return run_one(args)
    if args.eps_error:
        return eps_error(args)
    if not args.table:
        for system in args.systems:
            cmd = [sys.executable, __file__, "--only", system, *sys.argv[1:]]
            if subprocess.run(cmd).returncode:
                print(f"{system}: failed (see above)")
    print_table(Path(args.out), args.systems)


if __name__ == "__main__":
    main()
