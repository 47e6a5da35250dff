"""python -m diffusion.sampling: load the last checkpoint and write a grid of new digits."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from diffusion.checkpoint import resolve_checkpoint
from diffusion.config import Config, build_parser, config_overrides, parse_command_line
from diffusion.dataloader import to_uint8
from diffusion.errors import UserError, run_cli
from diffusion.generation import (generate, interpolation_noise, load_for_sampling, load_guide, sample_labels,
                                  sampler_spec, settings_for_guide, with_solver_steps)
from diffusion.uploads import REGIONS, digit_to_model_range, mask_keep, read_png_file, region_keep
from diffusion.visuals import Animation, save_grid


def add_sampling_args(parser) -> None:
    """The flags that say which images to make, shared by sampling and evaluate."""
    group = parser.add_argument_group("what to generate")
    group.add_argument("--checkpoint", default=None, help="checkpoint to load (default: the latest in --ckpt-dir)")
    group.add_argument("--num-images", type=int, default=16, help="images to generate (per row with --all-digits; default: 16)")
    group.add_argument("--digit", type=int, default=None, help="generate this class only (classifier-free guidance)")
    group.add_argument("--all-digits", action="store_true", default=False, help="a grid with one row per class")
    group.add_argument("--unconditional", action="store_true", default=False,
                        help="use the model without labels (default: guided, every class equally often)")
    group.add_argument("--steps", dest="sample_steps", type=int, help="alias of --sample-steps")
    group.add_argument("--no-ema", action="store_true", default=False, help="use the raw weights instead of their EMA")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser("sampling", "Generate images with a trained DDPM.")
    add_sampling_args(parser)
    editing = parser.add_argument_group("editing")
    editing.add_argument("--inpaint", default=None, metavar="IMAGE",
                         help="complete this square PNG digit (light strokes on dark, or dark on light) --num-images "
                              "ways; --digit guides the completion (default: no label)")
    editing.add_argument("--mask", default="bottom", metavar="MASK",
                         help=f"with --inpaint: what to generate, a PNG of the same side (white = generate) or one of "
                              f"{', '.join(REGIONS)} (default: %(default)s)")
    editing.add_argument("--interpolate", nargs="?", type=int, const=True, default=None, metavar="END_SEED",
                         help="a row of --num-images samples whose starting noise moves along a great circle from "
                              "--seed's to END_SEED's (default --seed + 1); deterministic sampler; --digit to guide "
                              "(default no label)")
    output = parser.add_argument_group("output")
    output.add_argument("--output", default=None, help="PNG grid to write (default: OUT_DIR/generated_images.png)")
    output.add_argument("--npy", default=None, help="also save the samples as uint8 N x H x W (x C) to this .npy file")
    output.add_argument("--gif", default=None, help="also write an animation of the reverse process to this GIF")
    output.add_argument("--gif-x0", action="store_true", default=False, help="show the predicted x0 beside x_t in the GIF")
    args = parse_command_line(parser, "sampling", argv)
    overrides = config_overrides(args)
    Config(**{**Config().to_dict(), **overrides})  # validate the flags before any work
    path = resolve_checkpoint(args.checkpoint, overrides.get("ckpt_dir", Config().ckpt_dir))
    net, cfg, device = load_for_sampling(path, overrides, use_ema=not args.no_ema)
    weak, guide = load_guide(path, cfg, device, use_ema=not args.no_ema)
    if args.num_images < 1:
        raise UserError(f"--num-images must be positive, got {args.num_images}")
    editing = edit_inputs(args, cfg, overrides)
    if editing:
        labels = sample_labels(cfg, args.num_images, args.digit, unconditional=args.digit is None, device=device)
    else:
        labels = sample_labels(cfg, args.num_images, args.digit, args.all_digits, args.unconditional, cfg.seed, device)
    cfg = settings_for_guide(cfg, overrides, weak is not None, labelled=labels is not None)
    cfg = with_solver_steps(dataclasses.replace(cfg, **editing.pop("cfg", {})), labels)
    n = len(labels) if labels is not None else args.num_images
    nrow = args.num_images if args.all_digits or args.interpolate is not None else max(1, int(round(n ** 0.5)))
    output = Path(args.output or Path(cfg.out_dir) / "generated_images.png")
    check_writable(output, args.npy, args.gif)
    animation = None
    if args.gif:
        animation = Animation(cfg.timesteps if cfg.sampler == "ddpm" else cfg.sample_steps, nrow, args.gif_x0)
    x = generate(net, cfg, n, labels, device, seed=cfg.seed, callback=animation, weak=weak, **editing)
    save_grid(x, output, nrow=nrow)
    guidance = f"{guide}, w {cfg.guidance:g}" + ("" if labels is not None else ", no labels")
    if labels is None and weak is None:
        guidance = "no labels, no guidance"
    print(f"wrote {n} images from {path} ({sampler_spec(cfg)}, {guidance}) to {output}")
    if args.npy:
        np.save(args.npy, to_uint8(x).cpu().numpy().squeeze(1) if cfg.channels == 1 else
                to_uint8(x).permute(0, 2, 3, 1).cpu().numpy())
        print(f"wrote {args.npy}")
    if animation:
        animation.save(Path(args.gif))
        print(f"wrote {args.gif}")


def edit_inputs(args, cfg: Config, overrides: dict) -> dict:
    """generate()'s extra arguments for --inpaint or --interpolate (and the settings they change), else {}."""
    interpolate = args.interpolate is not None
    if args.inpaint and interpolate:
        raise UserError("--inpaint and --interpolate are separate tasks; give one")
    if (args.inpaint or interpolate) and (args.all_digits or args.unconditional):
        raise UserError("--inpaint and --interpolate take --digit D or no label; not --all-digits or --unconditional")
    if interpolate:
        if overrides.get("eta", 0) != 0:
            raise UserError("--interpolate needs the deterministic sampler (eta 0): with fresh noise at every step "
                            "neighbouring images would not be related; drop --eta")
        print("interpolating with eta 0 (the deterministic sampler), so nearby starting noise gives nearby images")
        end = None if args.interpolate is True else args.interpolate  # bare --interpolate: seed + 1
        return {"x_T": interpolation_noise(cfg, args.num_images, cfg.seed, end), "cfg": {"eta": 0.0}}
    if args.inpaint:
        image, inverted = digit_to_model_range(read_png_file(args.inpaint, cfg.image_size, cfg.channels, "image"))
        if inverted:
            print(f"{args.inpaint} has a light background: inverted to light strokes on dark, as the model was trained")
        keep = (mask_keep(read_png_file(args.mask, cfg.image_size, cfg.channels, "mask"))
                if args.mask.lower().endswith(".png") else region_keep(args.mask, cfg.image_size))
        return {"known": image.expand(args.num_images, -1, -1, -1), "keep": keep}
    return {}


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
