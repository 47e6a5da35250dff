"""Generating images from a trained network: the library behind sampling, evaluate, the per-epoch
preview and the benchmarks. Loads a checkpoint for sampling, picks labels, runs a sampler in batches."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from tqdm import tqdm

from diffusion.autotune import choose_precision
from diffusion.checkpoint import check_trained_fields, load_checkpoint, load_weights
from diffusion.config import Config, from_dict, resolve_device, runtime_fields
from diffusion.diffusion_utils import schedule_from_config
from diffusion.editing import inpaint, slerp
from diffusion.errors import UserError
from diffusion.export import is_exported, load_exported
from diffusion.model import UNet, build_model
from diffusion.samplers import SAMPLERS, guidance_timesteps, guided, sampler_timesteps


def generate(net: UNet, cfg: Config, n: int, labels: torch.Tensor | None, device: torch.device,
             seed: int = 0, progress: bool = True, callback=None, x_T: torch.Tensor | None = None,
             known: torch.Tensor | None = None, keep: torch.Tensor | None = None,
             weak: UNet | None = None) -> torch.Tensor:
    """n images in [-1, 1] from cfg.sampler, in chunks of cfg.sample_batch; labels (n,) guide them, None
    samples unconditionally. Chunk k draws its noise from seed + k * 1_000_003, so the same command and
    seed give the same images, and a first chunk equals a single batch of the same seed.

    x_T (n, C, H, W) replaces the starting noise. known (n, C, H, W) and keep (1 or n, 1, H, W) inpaint: the
    pixels where keep is True stay those of known, the rest is generated (editing.inpaint, RePaint).
    weak (from load_guide) guides instead of the unconditional model (autoguidance)."""
    check_guidance(cfg, labels, weak)
    labels = None if labels is None else labels.to(device)
    cfg = with_solver_steps(cfg, labels)
    schedule_cpu = schedule_from_config(cfg)
    timesteps = sampler_timesteps(cfg.sampler, schedule_cpu, cfg.sample_steps)  # float64 math stays on the CPU
    schedule = schedule_cpu.to(device)
    guide_t = guidance_timesteps(schedule_cpu, *cfg.guidance_interval)
    # timed at the plain batch: guidance doubles it only inside its noise interval (2 of the default 10 steps),
    # and on one Xeon the doubled batch's pick (bf16 + channels_last) took 0.122 s per pass of 64, bf16 + NCHW 0.099
    precision = choose_precision(cfg, device, net, "sample", min(cfg.sample_batch, n), verbose=progress)
    memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    weak = None if weak is None else weak.to(device=device, memory_format=memory_format).eval()
    # DDIM steps (ddim, and inpainting's) have no noise above eta 1: their largest is DDPM's posterior variance
    eta = min(cfg.eta, 1.0) if cfg.sampler == "ddim" or known is not None else cfg.eta
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
        if x_T is not None:
            x = x_T[start:start + size].to(device)
        x = x.contiguous(memory_format=memory_format)
        model = guided(net.eval(), None if labels is None else labels[start:start + size], cfg.guidance,
                       null_label=cfg.num_classes, guide_t=guide_t, weak=weak)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.bf16):
            if known is None:
                x = SAMPLERS[cfg.sampler](model, x, schedule, timesteps, generator=g, callback=on_step,
                                          clip_x0=cfg.clip_x0, eta=eta)
            else:
                chunk_keep = keep if len(keep) == 1 else keep[start:start + size]
                x = inpaint(model, x, schedule, timesteps, known[start:start + size].to(device),
                            chunk_keep.to(device), generator=g, callback=on_step, clip_x0=cfg.clip_x0,
                            eta=eta, resample=cfg.resample)
        chunks.append(x.float())
    bar.close()
    return torch.cat(chunks)


def interpolation_noise(cfg: Config, n: int, seed: int, end_seed: int | None = None) -> torch.Tensor:
    """n starting points on the great circle from the noise of seed to that of end_seed (default seed + 1),
    drawn on the CPU."""
    a, b = (torch.randn(cfg.channels, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(s))
            for s in (seed, seed + 1 if end_seed is None else end_seed))
    return slerp(a, b, torch.linspace(0, 1, n))


def solver_steps(cfg: Config, guided: bool) -> int:
    """--steps, or with 0 (auto) 10 steps for labelled sampling and 20 without labels: at 10 steps the label-free
    model scored FD 304 and 323 (two seeds), at 20 steps 181 and 235; guided digits scored no better FD with more
    steps (see the README's recipe table)."""
    return cfg.sample_steps or min(10 if guided else 20, cfg.timesteps)


def with_solver_steps(cfg: Config, labels: torch.Tensor | None) -> Config:
    """cfg with --steps auto resolved for sampling with these labels (None: unconditional)."""
    return dataclasses.replace(cfg, sample_steps=solver_steps(cfg, labels is not None))


def check_guidance(cfg: Config, labels: torch.Tensor | None, weak: UNet | None = None) -> None:
    """A model trained with --p-uncond 0 never learned eps_u: refuse anything that would use it."""
    if not cfg.num_classes or cfg.p_uncond > 0:
        return
    if labels is None:
        raise UserError("this model was trained with --p-uncond 0, so it has no unconditional mode: drop "
                        "--unconditional, and give --inpaint or --interpolate a --digit")
    if cfg.guidance != 1 and weak is None:
        raise UserError(f"this model was trained with --p-uncond 0, so it has no unconditional eps to guide with; "
                        f"pass --guidance 1 (got {cfg.guidance})")


def load_for_sampling(path: Path, overrides: dict, use_ema: bool = True) -> tuple[UNet, Config, torch.device]:
    """Rebuild the U-Net from the checkpoint's config (plus command-line overrides) and load its weights."""
    if is_exported(path) and not use_ema:
        raise UserError(f"{path} is an exported model, which holds only the EMA weights; drop --no-ema")
    state = load_exported(path) if is_exported(path) else load_checkpoint(path)
    current = {name: getattr(Config(), name) for name in runtime_fields()}  # this version's defaults, not the run's
    cfg = dataclasses.replace(from_dict(state["config"]), **{**current, **overrides})
    check_trained_fields(state["config"], cfg, path)
    device = resolve_device(cfg.device)
    net = build_model(cfg)
    load_weights(net, state["ema" if use_ema else "model"], path)
    return net.to(device).eval(), cfg, device


def guide_path(path: Path, setting: str) -> Path | None:
    """The checkpoint to guide with for --guide-checkpoint SETTING when sampling from `path`: a given path, None
    for 'none', and for 'auto' the epoch checkpoint at half of path's completed epochs in the same folder (the
    default run's epoch_001.pth beside epoch_002.pth), or None when there is no such file."""
    if setting == "none":
        return None
    if setting != "auto":
        return Path(setting)
    if is_exported(path):
        return None
    half = load_checkpoint(path)["epoch"] // 2
    candidate = path.parent / f"epoch_{half:03d}.pth"
    return candidate if half >= 1 and candidate.resolve() != path.resolve() and candidate.exists() else None


def load_guide(path: Path, cfg: Config, device: torch.device, use_ema: bool = True) -> tuple[UNet | None, str]:
    """(the weaker network that guides sampling from `path`, or None for classifier-free guidance; one line
    saying which)."""
    weak_path = guide_path(path, cfg.guide_checkpoint)
    if weak_path is None:
        why = "" if cfg.guide_checkpoint == "none" else f" (no earlier epoch beside {path.name})"
        return None, f"classifier-free guidance{why}" if cfg.num_classes else f"no guidance{why}"
    state = load_exported(weak_path) if is_exported(weak_path) else load_checkpoint(weak_path)
    check_trained_fields(state["config"], cfg, weak_path)
    weak = build_model(cfg)
    load_weights(weak, state["ema" if use_ema else "model"], weak_path)
    return weak.to(device).eval(), f"autoguidance by {weak_path.name}"


# what scored best per guide (README, "Choosing the recipe"). The Config defaults (w 2.5 at 0.15 < sigma <= 2, eta 3)
# suit autoguided labelled sampling; with classifier-free guidance they cost FD and recall, and sampling without
# labels did best autoguided at every noise level
WITHOUT_AUTOGUIDANCE = {"guidance": 2.0, "eta": 1.0}
AUTOGUIDED_WITHOUT_LABELS = {"guidance": 2.0, "eta": 1.0, "guidance_interval": (0.0, math.inf)}


def settings_for_guide(cfg: Config, overrides, autoguided: bool, labelled: bool = True) -> Config:
    """cfg with --guidance, --eta (and without labels --guidance-interval) set to what suits the guide actually
    used, unless the command line set them (overrides: the names, or the dict, of the fields it set)."""
    if autoguided and labelled:
        return cfg
    settings = AUTOGUIDED_WITHOUT_LABELS if autoguided else WITHOUT_AUTOGUIDANCE
    return dataclasses.replace(cfg, **{k: v for k, v in settings.items() if k not in overrides})


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


def sampler_spec(cfg: Config) -> str:
    """How a sampler setting is named in tables and logs: NAME-STEPS:ETA, e.g. dpmpp-10:1 or ddpm-1000."""
    if cfg.sampler == "ddpm":
        return f"ddpm-{cfg.timesteps}"
    return f"{cfg.sampler}-{cfg.sample_steps}:{min(cfg.eta, 1.0) if cfg.sampler == 'ddim' else cfg.eta:g}"


def parse_sampler_spec(spec: str) -> dict:
    """'dpmpp-20' -> sampler dpmpp, 20 steps, eta 0; 'dpmpp-20:1' -> eta 1. The Config fields it sets."""
    name_steps, _, eta = spec.partition(":")
    name, _, steps = name_steps.partition("-")
    try:
        return {"sampler": name, "sample_steps": int(steps), "eta": float(eta or 0)}
    except ValueError:
        raise UserError(f"a sampler is written NAME-STEPS[:ETA], like dpmpp-20 or ddim-50:1; got {spec!r}") from None
