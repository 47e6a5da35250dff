"""python -m diffusion.sampling: load the last checkpoint and write a grid of new digits."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffusion.checkpoint import load_network, resolve_checkpoint
from diffusion.cli import add_generation_args, build_parser, parse, run_cli
from diffusion.config import MAX_IMAGES, DataConfig, RuntimeConfig, SampleConfig
from diffusion.dataloader import test_digit, to_uint8
from diffusion.errors import UserError, writing
from diffusion.generation import generate, interpolation_noise, prepare, sample_labels
from diffusion.uploads import REGIONS, digit_to_model_range, mask_keep, read_png_file, region_keep
from diffusion.visuals import Animation, save_grid, with_inpainting_input

PAPER = {"sampler": "ddpm", "guide_checkpoint": "none"}  # with --unconditional: Ho et al. 2020's Algorithm 2
OUTPUT_NAMES = {"sample": "generated_images.png", "inpaint": "inpainting.png", "interpolate": "interpolation.png"}


def parser():
    p = build_parser("sampling", "Generate images with a trained DDPM.", SampleConfig, RuntimeConfig,
                     (DataConfig, ("data_root",)))
    add_generation_args(p)
    p.add_argument("--paper", action="store_true", default=False,
                   help="the paper's DDPM exactly: Algorithm 2 over all T steps, no labels, no guidance "
                        "(Ho et al. 2020)")
    editing = p.add_argument_group("editing")
    editing.add_argument("--inpaint", default=None, metavar="IMAGE",
                         help="complete this square PNG digit (light strokes on dark, or dark on light), or MNIST "
                              "test digit number N, --num-images ways; --digit guides the completion (default: no "
                              "label)")
    editing.add_argument("--mask", default=None, metavar="MASK",
                         help=f"with --inpaint: what to generate, a PNG of the same side (white = generate) or one of "
                              f"{', '.join(REGIONS)} (default: bottom)")
    editing.add_argument("--interpolate", nargs="?", type=int, const=True, default=None, metavar="END_SEED",
                         help="a row of --num-images samples whose starting noise moves along a great circle from "
                              "--seed's to END_SEED's (default --seed + 1); deterministic sampler; --digit to guide "
                              "(default no label)")
    output = p.add_argument_group("output")
    output.add_argument("--output", default=None, help="PNG grid to write (default: OUT_DIR/generated_images.png; "
                                                       "inpainting.png and interpolation.png for those tasks)")
    output.add_argument("--npy", default=None, help="also save the samples as uint8 N x H x W (x C) to this .npy file")
    output.add_argument("--gif", default=None, help="also write an animation of the reverse process to this GIF")
    output.add_argument("--gif-x0", action="store_true", default=False, help="show the predicted x0 beside x_t in the GIF")
    return p


def main(argv: list[str] | None = None) -> None:
    args, configs = parse(parser(), argv)
    asked, runtime_cfg = configs[SampleConfig], configs[RuntimeConfig]
    task = check_task(args)
    if args.paper:
        clash = [name for name in ("sampler", "sample_steps", "eta", "guidance", "guide_checkpoint",
                                   "guidance_interval") if name in vars(args)]
        if clash:
            raise UserError(f"--paper fixes the sampler and the guidance; drop --{clash[0].replace('_', '-')}")
        asked = asked.replace(**PAPER)
        args.unconditional = True
    output = Path(args.output or Path(runtime_cfg.out_dir) / OUTPUT_NAMES[task])
    check_writable(output, args.npy, args.gif)
    loaded = load_network(resolve_checkpoint(args.checkpoint, runtime_cfg.ckpt_dir), use_ema=not args.no_ema)
    model, editing = loaded.config, {}
    if task == "sample":
        labels = sample_labels(model, args.num_images, args.digit, args.all_digits, args.unconditional, runtime_cfg.seed)
    else:
        labels = sample_labels(model, args.num_images, args.digit, unconditional=args.digit is None)
    n = len(labels) if labels is not None else args.num_images
    recipe, weak, runtime = prepare(loaded, asked, runtime_cfg, task=task, labelled=labels is not None, n=n,
                                    use_ema=not args.no_ema)
    if task == "interpolate":
        end = None if args.interpolate is True else args.interpolate  # bare --interpolate: seed + 1
        editing = {"x_T": interpolation_noise(model, n, runtime_cfg.seed, end)}
    elif task == "inpaint":
        editing = inpaint_inputs(args, model, n, configs[DataConfig])
    nrow = args.num_images if args.all_digits or task == "interpolate" else max(1, int(round(n ** 0.5)))
    animation = Animation(recipe.steps, nrow, args.gif_x0) if args.gif else None
    x = generate(loaded.net, model, recipe, n, labels, runtime, seed=runtime_cfg.seed, weak=weak, callback=animation,
                 **editing)
    with writing(output):
        if task == "inpaint":
            save_grid(with_inpainting_input(editing["known"][0], editing["keep"], x, nrow), output, nrow=nrow + 1)
        else:
            save_grid(x, output, nrow=nrow)
    print(f"wrote {n} images from {loaded.path} ({recipe}) to {output}")
    if args.npy:
        pixels = to_uint8(x).cpu()
        with writing(args.npy):
            np.save(args.npy, pixels.squeeze(1).numpy() if model.channels == 1 else pixels.permute(0, 2, 3, 1).numpy())
        print(f"wrote {args.npy}")
    if animation:
        with writing(args.gif):
            animation.save(Path(args.gif))
        print(f"wrote {args.gif}")


def check_task(args) -> str:
    """'sample', 'inpaint' or 'interpolate', after refusing flags that do not go together."""
    interpolate = args.interpolate is not None
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UserError(f"--num-images must be in 1..{MAX_IMAGES}, got {args.num_images}")
    if args.inpaint and interpolate:
        raise UserError("--inpaint and --interpolate are separate tasks; give one")
    if (args.inpaint or interpolate) and (args.all_digits or args.unconditional):
        raise UserError("--inpaint and --interpolate take --digit D or no label; not --all-digits or --unconditional")
    if args.mask and not args.inpaint:
        raise UserError("--mask says what --inpaint generates; give --inpaint IMAGE too")
    if args.paper and (args.inpaint or interpolate or args.digit is not None or args.all_digits):
        raise UserError("--paper samples the unconditional model with Algorithm 2; it takes no --digit, "
                        "--all-digits, --inpaint or --interpolate")
    return "inpaint" if args.inpaint else "interpolate" if interpolate else "sample"


def inpaint_inputs(args, model, n: int, data: DataConfig) -> dict:
    """generate()'s known image and kept pixels for --inpaint IMAGE (or a test digit's number) --mask MASK."""
    if args.inpaint.isdigit():
        image, label = test_digit(data, int(args.inpaint))
        image, inverted = digit_to_model_range(image)
        print(f"inpainting test digit {args.inpaint} (a {label})")
    else:
        image, inverted = digit_to_model_range(read_png_file(args.inpaint, model.image_size, model.channels, "image"))
    if inverted:
        print(f"{args.inpaint} has a light background: inverted to light strokes on dark, as the model was trained")
    mask = args.mask or "bottom"
    keep = (mask_keep(read_png_file(mask, model.image_size, model.channels, "mask")) if mask.lower().endswith(".png")
            else region_keep(mask, model.image_size))
    return {"known": image.expand(n, -1, -1, -1), "keep": keep}


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
