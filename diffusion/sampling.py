"""python -m diffusion.sampling: load the last checkpoint and write a grid of new digits."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffusion.checkpoint import check_trained_fields, latest_checkpoint, load_checkpoint, load_weights
from diffusion.config import Config, build_parser, config_overrides, from_dict, resolve_device
from diffusion.dataloader import to_uint8
from diffusion.diffusion_utils import schedule_from_config
from diffusion.errors import UserError, run_cli
from diffusion.model import UNet, build_model
from diffusion.samplers import SAMPLERS, guided, sampler_timesteps
from diffusion.train import amp_enabled


def generate(net: UNet, cfg: Config, n: int, labels: torch.Tensor | None, device: torch.device,
             seed: int = 0, progress: bool = True, callback=None) -> torch.Tensor:
    """n images in [-1, 1] from cfg.sampler, in chunks of cfg.sample_batch; labels (n,) guide them, None
    samples unconditionally. Chunk k draws its noise from seed + k * 1_000_003, so the same command and
    seed give the same images, and a first chunk equals a single batch of the same seed."""
    check_guidance(cfg, labels)
    schedule_cpu = schedule_from_config(cfg)
    timesteps = sampler_timesteps(cfg.sampler, schedule_cpu, cfg.sample_steps)  # float64 math stays on the CPU
    schedule = schedule_cpu.to(device)
    starts = range(0, n, cfg.sample_batch)
    bar = tqdm(total=len(timesteps) * len(starts), unit="step", disable=not progress,
               desc=f"sampling ({cfg.sampler}, {len(timesteps)} steps{', %d batches' % len(starts) if len(starts) > 1 else ''})")

    def on_step(i, xt, x0):
        bar.update()
        if callback:
            callback(i, xt, x0)

    chunks = []
    for k, start in enumerate(starts):
        size = min(cfg.sample_batch, n - start)
        g = torch.Generator(device).manual_seed(seed + k * 1_000_003)
        x = torch.randn(size, cfg.channels, cfg.image_size, cfg.image_size, device=device, generator=g)
        model = guided(net.eval(), None if labels is None else labels[start:start + size], cfg.guidance,
                       null_label=cfg.num_classes)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(cfg, device)):
            x = SAMPLERS[cfg.sampler](model, x, schedule, timesteps, generator=g, callback=on_step,
                                      clip_x0=cfg.clip_x0, eta=cfg.eta)
        chunks.append(x.float())
    bar.close()
    return torch.cat(chunks)


def check_guidance(cfg: Config, labels: torch.Tensor | None) -> None:
    """A model trained with --p-uncond 0 never learned eps_u: refuse anything that would use it."""
    if not cfg.num_classes or cfg.p_uncond > 0:
        return
    if labels is None:
        raise UserError("this model was trained with --p-uncond 0, so it has no unconditional mode; "
                        "drop --unconditional")
    if cfg.guidance != 1:
        raise UserError(f"this model was trained with --p-uncond 0, so it has no unconditional eps to guide with; "
                        f"pass --guidance 1 (got {cfg.guidance})")


# settings of how to sample and where, as opposed to what was trained
RUNTIME_FIELDS = ("sampler", "sample_steps", "sample_batch", "eta", "guidance", "clip_x0", "device", "seed", "threads", "out_dir", "ckpt_dir")


def load_for_sampling(path: Path, overrides: dict, use_ema: bool = True) -> tuple[UNet, Config, torch.device]:
    """Rebuild the U-Net from the checkpoint's config (plus command-line overrides) and load its weights."""
    state = load_checkpoint(path)
    current = {name: getattr(Config(), name) for name in RUNTIME_FIELDS}  # this version's defaults, not the run's
    cfg = dataclasses.replace(from_dict(state["config"]), **{**current, **overrides})
    check_trained_fields(state["config"], cfg, path)
    device = resolve_device(cfg.device)
    net = build_model(cfg)
    load_weights(net, state["ema" if use_ema else "model"], path)
    return net.to(device).eval(), cfg, device


def sample_labels(cfg: Config, n: int, digit: int | None = None, all_digits: bool = False,
                  unconditional: bool = False, seed: int = 0, device="cpu") -> torch.Tensor | None:
    """The labels to guide n samples with, or None for the unconditional model.

    By default a conditional model samples every class equally often, in random order: guided samples
    are much cleaner than the unconditional model's, which sees only p_uncond of the training labels.
    """
    if unconditional or not cfg.num_classes:
        if digit is not None or all_digits:
            raise UserError("this checkpoint was trained without labels; --digit / --all-digits need a "
                            "conditional model" if not cfg.num_classes else "--unconditional excludes --digit / --all-digits")
        return None
    if digit is not None and not 0 <= digit < cfg.num_classes:
        raise UserError(f"--digit must be in 0..{cfg.num_classes - 1}, got {digit}")
    if digit is not None:
        return torch.full((n,), digit, device=device, dtype=torch.long)
    if all_digits:  # one row per class
        return torch.arange(cfg.num_classes, device=device).repeat_interleave(n)
    balanced = torch.arange(n) % cfg.num_classes
    return balanced[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].to(device)


def add_sampling_args(parser) -> None:
    parser.add_argument("--checkpoint", default=None, help="checkpoint to load (default: the latest in --ckpt-dir)")
    parser.add_argument("--num-images", type=int, default=16, help="images to generate (per row with --all-digits)")
    parser.add_argument("--digit", type=int, default=None, help="generate this class only (classifier-free guidance)")
    parser.add_argument("--all-digits", action="store_true", default=False, help="a grid with one row per class")
    parser.add_argument("--unconditional", action="store_true", default=False,
                        help="use the model without labels (default: guided, every class equally often)")
    parser.add_argument("--steps", dest="sample_steps", type=int, help="alias of --sample-steps")
    parser.add_argument("--no-ema", action="store_true", default=False, help="use the raw weights instead of their EMA")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("Generate images with a trained DDPM.")
    add_sampling_args(parser)
    parser.add_argument("--output", default=None, help="PNG grid to write (default: OUT_DIR/generated_images.png)")
    parser.add_argument("--npy", default=None, help="also save the samples as uint8 N x H x W (x C) to this .npy file")
    parser.add_argument("--gif", default=None, help="also write an animation of the reverse process to this GIF")
    parser.add_argument("--gif-x0", action="store_true", default=False, help="show the predicted x0 beside x_t in the GIF")
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    Config(**{**Config().to_dict(), **overrides})  # validate the flags before any work
    ckpt_dir = Path(overrides.get("ckpt_dir", Config().ckpt_dir))
    path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(ckpt_dir)
    net, cfg, device = load_for_sampling(path, overrides, use_ema=not args.no_ema)
    if args.num_images < 1:
        raise UserError(f"--num-images must be positive, got {args.num_images}")
    labels = sample_labels(cfg, args.num_images, args.digit, args.all_digits, args.unconditional, cfg.seed, device)
    n = len(labels) if labels is not None else args.num_images
    nrow = args.num_images if args.all_digits else max(1, int(round(n ** 0.5)))
    output = Path(args.output or Path(cfg.out_dir) / "generated_images.png")
    check_writable(output, args.npy, args.gif)
    animation = None
    if args.gif:
        from diffusion.visuals import Animation
        animation = Animation(cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps, nrow, args.gif_x0)
    x = generate(net, cfg, n, labels, device, seed=cfg.seed, callback=animation)
    from diffusion.visuals import save_grid
    save_grid(x, output, nrow=nrow)
    print(f"wrote {n} images from {path} ({cfg.sampler}, guidance {cfg.guidance if labels is not None else 'none'}) to {output}")
    if args.npy:
        np.save(args.npy, to_uint8(x).cpu().numpy().squeeze(1) if cfg.channels == 1 else
                to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
        print(f"wrote {args.npy}")
    if animation:
        animation.save(Path(args.gif))
        print(f"wrote {args.gif}")


def check_writable(*paths) -> None:
    """Fail before sampling, not after, when an output cannot be written."""
    for p in paths:
        if not p:
            continue
        parent = Path(p).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the folder for {p}: {err.strerror or err}") from None
        if not os.access(parent, os.W_OK) or Path(p).is_dir():
            raise UserError(f"cannot write {p}: the folder is not writable or the path is a folder")


if __name__ == "__main__":
    run_cli(main)
