"""One Config dataclass for every hyper-parameter, overridable from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from diffusion.diffusion_utils import final_alpha_bar
from diffusion.errors import UserError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
DATASETS = ("mnist", "fashion-mnist", "folder")
MAX_FINAL_ALPHA_BAR = 1e-2  # x_T must be this close to N(0, I): samplers start there


@dataclass
class Config:
    # --- data ---
    dataset: str = "mnist"  # mnist | fashion-mnist | folder (an ImageFolder tree)
    data_root: str = field(default_factory=lambda: os.environ.get("DIFFUSION_DATA_ROOT", "data"))  # or $DIFFUSION_DATA_ROOT
    download: bool = True  # fetch MNIST / Fashion-MNIST when missing (needs internet)
    limit_train: int = 0  # train on the first N images only (0 = all); for quick runs
    image_size: int = 28  # native MNIST size; must divide by 2**(levels-1)
    channels: int = 1  # image channels; set from the dataset when training
    num_classes: int = 10  # labels for guidance; set from the dataset (0 = unconditional)
    # --- diffusion (Ho et al. 2020, Sec. 4) ---
    timesteps: int = 1000  # T
    schedule: str = "linear"  # linear (betas 1e-4..0.02) | cosine (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4  # beta_1 of the linear schedule
    beta_end: float = 0.02  # beta_T of the linear schedule
    # --- model: U-Net at 28 -> 14 -> 7 ---
    base_channels: int = 32  # width at 28x28, where convolutions cost the most FLOPs
    channel_mults: tuple[int, ...] = (1, 2, 2)  # widths 32/64/64 at 28/14/7
    num_res_blocks: int = 1  # residual blocks per level; one is 1.4x faster than two, same quality here
    attention_resolutions: tuple[int, ...] = (7,)  # self-attention only where it is cheap
    dropout: float = 0.0  # no dropout: a few epochs do not overfit 60k digits
    # --- training ---
    epochs: int = 2  # ~14 minutes on a 2-core CPU with the defaults
    batch_size: int = 128  # global batch (split across processes under torchrun)
    lr: float = 2e-3  # AdamW peak learning rate; high because the net is small
    weight_decay: float = 0.0
    warmup_steps: int = 200  # linear LR warm-up, then cosine decay to zero
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    ema_decay: float = 0.999  # EMA of weights, with warm-up min(decay, (1+n)/(10+n))
    p_uncond: float = 0.1  # chance of dropping a label to "no label" (classifier-free guidance)
    amp: str = "auto"  # bf16 autocast: auto (CUDA only) | bf16 | none; on CPUs measure first, see README
    compile: bool = False  # torch.compile the U-Net (pays on CUDA; slow to start on CPU)
    channels_last: bool = True  # memory format for the convolutions (~10% faster on CPU here)
    seed: int = 0  # model init, data order and noise
    device: str = "auto"  # auto = cuda, then mps, then cpu
    threads: int = 0  # CPU threads for torch (0 = torch's default)
    log_every: int = 25  # steps between progress-bar updates (each is a host sync)
    # --- sampling ---
    sampler: str = "dpmpp"  # ddpm (all T steps) | ddim | dpmpp (DPM-Solver++(2M))
    sample_steps: int = 10  # steps for ddim / dpmpp (dpmpp-10: 0.7 s for 16 digits, see README)
    sample_batch: int = 64  # images per sampling batch; bigger batches run slower per image on a CPU (cache)
    eta: float = 1.0  # ddim / dpmpp noise: 0 deterministic (ODE), 1 = DDPM posterior variance (SDE)
    guidance: float = 2.0  # eps_u + w (eps_c - eps_u); 1 = conditional only, 0 = unconditional
    clip_x0: bool = True  # clip predicted x0 to [-1, 1] during sampling
    # --- I/O ---
    ckpt_dir: str = os.path.join("diffusion", "checkpoints")
    out_dir: str = os.path.join("diffusion", "outputs")
    keep_last: int = 0  # keep only the newest K checkpoints, epoch and timed (0 = keep all)
    save_every: str = "5min"  # also checkpoint every N minutes ("5min") or steps ("200steps"); "0" = epochs only
    sample_every: int = 1  # epochs between preview grids (0 = never)

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.validate()

    def validate(self) -> None:
        """Reject settings that make no sense, once, with one readable line."""
        positive = ("epochs", "batch_size", "timesteps", "lr", "base_channels", "num_res_blocks",
                    "image_size", "channels", "sample_steps", "sample_batch", "log_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("limit_train", "keep_last", "sample_every", "threads", "num_classes", "weight_decay",
                     "warmup_steps", "grad_clip", "guidance", "eta"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        parse_interval(self.save_every)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("amp", self.amp, ("auto", "bf16", "none"))
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError(f"need 0 < --beta-start < --beta-end < 1, got {self.beta_start}, {self.beta_end}")
        self._validate_noise_schedule()
        if self.sample_steps > self.timesteps:
            raise UserError(f"--steps {self.sample_steps} exceeds the {self.timesteps} timesteps of the diffusion")
        if not 0 <= self.p_uncond <= 1 or not 0 <= self.ema_decay < 1 or not 0 <= self.dropout < 1:
            raise UserError("--p-uncond must be in [0, 1], --ema-decay and --dropout in [0, 1)")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise UserError(f"--channel-mults must be positive integers, got {self.channel_mults}")
        if self.base_channels % 8:
            raise UserError(f"--base-channels must be a multiple of 8 (GroupNorm groups), got {self.base_channels}")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise UserError(f"--image-size {self.image_size} must divide by {factor}, the U-Net's "
                            f"downsampling factor for {len(self.channel_mults)} levels")

    def _validate_noise_schedule(self) -> None:
        """Every sampler starts from N(0, I), so the forward process must actually end there."""
        scale = 1000 / self.timesteps  # linear betas are scaled to T, see diffusion_utils.linear_betas
        if self.schedule == "linear" and self.beta_end * scale >= 1:
            raise UserError(f"--timesteps {self.timesteps} is too few for the linear schedule: its last beta "
                            f"would be {self.beta_end * scale:.2f} >= 1; use at least {math.floor(self.beta_end * 1000) + 1}")
        left = final_alpha_bar(self.schedule, self.timesteps, self.beta_start, self.beta_end)
        if left > MAX_FINAL_ALPHA_BAR:
            raise UserError(f"this noise schedule leaves alpha_bar_T = {left:.3g} of the signal at t = T, so x_T is "
                            f"not pure noise (need <= {MAX_FINAL_ALPHA_BAR}); raise --beta-end or --timesteps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_interval(text: str) -> tuple[float, str]:
    """'5min' -> (5.0, 'min'), '200steps' -> (200, 'steps'), '0' -> (0, 'off'); else a UserError."""
    text = text.strip().lower()
    if text in ("0", "off", "never"):
        return 0, "off"
    for unit, cast in (("min", float), ("steps", int)):
        number = text.removesuffix(unit)
        if number != text:
            try:
                amount = cast(number)
            except ValueError:
                break
            if amount > 0:
                return amount, unit
    raise UserError(f"--save-every takes minutes or steps, like 5min or 200steps (0 = only at epoch ends); got {text!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"--{_flag(name)} must be one of {', '.join(choices)}; got {value!r}")


def from_dict(values: dict) -> Config:
    """Rebuild a Config from a checkpoint's plain dict, ignoring keys this version no longer has."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in known})


def build_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per Config field; unset flags stay absent from the result."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        kwargs = {"help": f"(default: {default!r})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=int)
        else:
            kwargs["type"] = type(default)
        parser.add_argument(f"--{_flag(f.name)}", dest=f.name, **kwargs)
    parser.add_argument("--debug", action="store_true", default=False, help="show full tracebacks on errors")
    return parser


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names}


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the command line: defaults, then overrides; unknown flags exit with usage."""
    args = build_parser("Train a DDPM on MNIST.").parse_args(argv)
    return Config(**config_overrides(args))


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device torch knows ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but torch sees no GPU here")
    return device
