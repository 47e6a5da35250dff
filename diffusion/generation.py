"""Drawing images with a trained network: the labels, the guide network and the batch loop that apply a Recipe.
Nothing here decides a sampling setting (diffusion/recipe.py does)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from diffusion.autotune import setup_runtime
from diffusion.checkpoint import Loaded, check_can_guide, load_network
from diffusion.config import ModelConfig, RuntimeConfig, SampleConfig
from diffusion.diffusion_utils import schedule_from_config
from diffusion.editing import inpaint, slerp
from diffusion.errors import UserError
from diffusion.model import UNet
from diffusion.recipe import Recipe, choose_recipe
from diffusion.runtime import Runtime
from diffusion.samplers import SAMPLERS, guidance_timesteps, guided, sampler_timesteps

CHUNK_SEED_STRIDE = 1_000_003  # chunk k of a run draws its noise from seed + k * this


def generate(net: UNet, model: ModelConfig, recipe: Recipe, n: int, labels: torch.Tensor | None, runtime: Runtime, *,
             seed: int = 0, weak: UNet | None = None, progress: bool = True, callback=None,
             x_T: torch.Tensor | None = None, known: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """n images in [-1, 1] drawn as `recipe` says, in chunks of recipe.batch; labels (n,) guide them, None samples
    without labels. Chunk k draws its noise from seed + k * CHUNK_SEED_STRIDE, so the same command and seed give
    the same images, and a first chunk equals a single batch of the same seed.

    x_T (n, C, H, W) replaces the starting noise. known (n, C, H, W) and keep (1 or n, 1, H, W) inpaint: the
    pixels where keep is True stay those of known, the rest is generated (editing.inpaint, RePaint).
    weak, the network at recipe.guide, guides instead of the unconditional model (autoguidance)."""
    schedule_cpu = schedule_from_config(model)
    timesteps = sampler_timesteps(recipe.sampler, schedule_cpu, recipe.steps)  # float64 math stays on the CPU
    schedule = schedule_cpu.to(runtime.device)
    guide_t = guidance_timesteps(schedule_cpu, *recipe.interval)
    net = runtime.prepare(net).eval()
    weak = None if weak is None else runtime.prepare(weak).eval()
    labels = None if labels is None else labels.to(runtime.device)
    starts = range(0, n, recipe.batch)
    batches = f", {len(starts)} batches" if len(starts) > 1 else ""
    bar = tqdm(total=len(timesteps) * len(starts), unit="step", disable=not progress,
               desc=f"sampling ({recipe.sampler}, {len(timesteps)} steps{batches})")

    def on_step(i, xt, x0):
        bar.update()
        if callback:
            callback(i, xt, x0)

    chunks = []
    for k, start in enumerate(starts):
        size = min(recipe.batch, n - start)
        g = torch.Generator(runtime.device).manual_seed(seed + k * CHUNK_SEED_STRIDE)
        x = torch.randn(size, model.channels, model.image_size, model.image_size, device=runtime.device, generator=g)
        x = runtime.batch(x if x_T is None else x_T[start:start + size])
        eps = guided(net, None if labels is None else labels[start:start + size], recipe.guidance,
                     null_label=recipe.null_label, guide_t=guide_t, weak=weak)
        with runtime.autocast():
            if known is not None:
                chunk_keep = keep if len(keep) == 1 else keep[start:start + size]
                x = inpaint(eps, x, schedule, timesteps, known[start:start + size].to(runtime.device),
                            chunk_keep.to(runtime.device), generator=g, callback=on_step, clip_x0=recipe.clip_x0,
                            eta=recipe.eta, resample=recipe.resample)
            elif recipe.sampler == "ddpm":
                x = SAMPLERS["ddpm"](eps, x, schedule, timesteps, generator=g, callback=on_step, clip_x0=recipe.clip_x0)
            else:
                x = SAMPLERS[recipe.sampler](eps, x, schedule, timesteps, generator=g, callback=on_step,
                                             clip_x0=recipe.clip_x0, eta=recipe.eta)
        chunks.append(x.float())
    bar.close()
    return torch.cat(chunks)


def load_guide(recipe: Recipe, loaded: Loaded, use_ema: bool = True) -> UNet | None:
    """The weaker network at recipe.guide, checked to share the diffusion and labels of the one it guides, or None."""
    if recipe.guide is None:
        return None
    weak = load_network(recipe.guide, use_ema)
    check_can_guide(weak.config, loaded.config, recipe.guide, recipe.labelled)
    return weak.net


def prepare(loaded: Loaded, asked: SampleConfig, runtime_cfg: RuntimeConfig, *, task: str, labelled: bool, n: int,
            use_ema: bool = True, verbose: bool = True) -> tuple[Recipe, UNet | None, Runtime]:
    """(the recipe, its guide network, the runtime) for drawing n images from `loaded`: what every command that
    samples does first, in this order."""
    recipe = choose_recipe(loaded.config, asked, task=task, labelled=labelled, checkpoint=loaded.path,
                           epoch=loaded.epoch)
    weak = load_guide(recipe, loaded, use_ema)
    runtime = setup_runtime(runtime_cfg, loaded.config, loaded.net, "sample", min(recipe.batch, n), verbose=verbose)
    return recipe, weak, runtime


def interpolation_noise(model: ModelConfig, n: int, seed: int, end_seed: int | None = None) -> torch.Tensor:
    """n starting points on the great circle from the noise of seed to that of end_seed (default seed + 1),
    drawn on the CPU."""
    a, b = (torch.randn(model.channels, model.image_size, model.image_size, generator=torch.Generator().manual_seed(s))
            for s in (seed, seed + 1 if end_seed is None else end_seed))
    return slerp(a, b, torch.linspace(0, 1, n))


def sample_labels(model: ModelConfig, n: int, digit: int | None = None, all_digits: bool = False,
                  unconditional: bool = False, seed: int = 0, device="cpu") -> torch.Tensor | None:
    """The labels to guide n samples with, or None for the model without labels.

    By default a conditional model samples every class equally often, in random order: guided samples
    are much cleaner than the unconditional model's, which sees only p_uncond of the training labels.
    """
    if unconditional or not model.num_classes:
        if digit is not None or all_digits:
            raise UserError("this checkpoint was trained without labels; --digit / --all-digits need a "
                            "conditional model" if not model.num_classes else
                            "--unconditional excludes --digit / --all-digits")
        return None
    if digit is not None and not 0 <= digit < model.num_classes:
        raise UserError(f"--digit must be in 0..{model.num_classes - 1}, got {digit}")
    if digit is not None:
        return torch.full((n,), digit, device=device, dtype=torch.long)
    if all_digits:  # one row per class
        return torch.arange(model.num_classes, device=device).repeat_interleave(n)
    balanced = torch.arange(n) % model.num_classes
    return balanced[torch.randperm(n, generator=torch.Generator().manual_seed(seed))].to(device)

