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
from diffusion.logger import LOGGERS

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
DATASETS = ("mnist", "fashion-mnist", "folder")
AMP_MODES = ("auto", "bf16", "none")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
MAX_FINAL_ALPHA_BAR = 1e-2  # x_T must be this close to N(0, I): samplers start there


GROUPS = {  # argument groups, in --help order
    "data": "data",
    "model": "model: the U-Net (fixed by training)",
    "diffusion": "diffusion: the noise schedule (fixed by training)",
    "training": "training",
    "sampling": "sampling (also used for the per-epoch preview)",
    "runtime": "where and how it runs",
}


def setting(default, help: str, group: str, *, choices: tuple[str, ...] | None = None, trained: bool = False,
            factory=None):
    """A Config field that carries its own help sentence, group, allowed values and whether training fixes it."""
    meta = {"help": help, "group": group, "choices": choices, "trained": trained}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


@dataclass
class Config:
    # --- data ---
    dataset: str = setting("mnist", "which images to train on: MNIST, Fashion-MNIST, or an ImageFolder tree "
                           "(one sub-folder per class) at --data-root", "data", choices=DATASETS)
    data_root: str = setting(None, "folder holding MNIST/raw (or FashionMNIST/raw, or the ImageFolder tree)", "data",
                             factory=lambda: os.environ.get("DIFFUSION_DATA_ROOT", "data"))
    download: bool = setting(True, "download MNIST / Fashion-MNIST into --data-root when missing (needs internet)",
                             "data")
    limit_train: int = setting(0, "train on the first N images only, for quick runs (0 = all)", "data")
    image_size: int = setting(28, "image side in pixels, set from the dataset; must divide by 2**(levels - 1)",
                              "model", trained=True)
    channels: int = setting(1, "image channels, set from the dataset", "model", trained=True)
    num_classes: int = setting(10, "labels for guidance, set from the dataset; 0 trains an unconditional model",
                               "model", trained=True)
    # --- diffusion (Ho et al. 2020, Sec. 4) ---
    timesteps: int = setting(1000, "T, the number of noise levels", "diffusion", trained=True)
    schedule: str = setting("linear", "betas: linear (Ho et al.) or cosine (Nichol & Dhariwal 2021)", "diffusion",
                            choices=SCHEDULES, trained=True)
    beta_start: float = setting(1e-4, "first beta of the linear schedule at T = 1000 (scaled by 1000 / T)",
                                "diffusion", trained=True)
    beta_end: float = setting(0.02, "last beta of the linear schedule at T = 1000 (scaled by 1000 / T)",
                              "diffusion", trained=True)
    # --- model: U-Net at 28 -> 14 -> 7 ---
    base_channels: int = setting(32, "U-Net width at full resolution, where convolutions cost the most; "
                                 "a multiple of 8", "model", trained=True)
    channel_mults: tuple[int, ...] = setting(None, "width multipliers per level (1 2 2 = 32/64/64 at 28/14/7)",
                                             "model", trained=True, factory=lambda: (1, 2, 2))
    num_res_blocks: int = setting(1, "residual blocks per level; one is 1.4x faster than two at equal quality here",
                                  "model", trained=True)
    attention_resolutions: tuple[int, ...] = setting(None, "resolutions with self-attention (only where it is cheap)",
                                                     "model", trained=True, factory=lambda: (7,))
    dropout: float = setting(0.0, "dropout in the residual blocks; a few epochs do not overfit 60k digits",
                             "training")
    # --- training ---
    epochs: int = setting(2, "passes over the training set (7 to 12 minutes on a 2-core CPU with the defaults)",
                          "training")
    minutes: float = setting(0.0, "train for this many minutes instead of --epochs, with the learning rate "
                             "decaying to zero when they are spent (0 = use --epochs)", "training")
    batch_size: int = setting(128, "images per step, split across processes under torchrun", "training")
    lr: float = setting(2e-3, "AdamW peak learning rate; high because the network is small", "training")
    weight_decay: float = setting(0.0, "AdamW weight decay", "training")
    warmup_steps: int = setting(200, "steps of linear learning-rate warm-up, then cosine decay to zero", "training")
    min_snr_gamma: float = setting(0.0, "weigh each t's loss by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. "
                                   "2023); 0 = the paper's unweighted L_simple", "training")
    grad_clip: float = setting(1.0, "maximum gradient norm (0 = no clipping)", "training")
    ema_decay: float = setting(0.999, "decay of the weights' moving average that sampling uses, warmed up as "
                               "min(decay, (1 + n) / (10 + n))", "training")
    p_uncond: float = setting(0.1, "chance of replacing a label by 'no label', so one network also learns the "
                              "unconditional model that guidance needs", "training")
    compile: bool = setting(False, "torch.compile the U-Net (pays on CUDA; slow to start on a CPU)", "training")
    log_every: int = setting(25, "steps between progress-bar and loss-curve updates (each reads the loss: a sync)",
                             "training")
    save_every: str = setting("5min", "also checkpoint every N minutes (5min) or steps (200steps) inside an "
                              "epoch; 0 = only at epoch ends", "training")
    keep_last: int = setting(0, "keep only the newest K checkpoints, epoch and timed (0 = keep all)", "training")
    sample_every: int = setting(1, "epochs between preview grids in --out-dir (0 = never)", "training")
    logger: str = setting("none", "also log the loss, learning rate and preview grids for TensorBoard, in "
                          "OUT_DIR/tensorboard (pip install -e \".[tensorboard]\")", "training", choices=LOGGERS)
    # --- sampling ---
    sampler: str = setting("dpmpp", "ddpm (all T steps, Algorithm 2), ddim, or dpmpp (DPM-Solver++(2M))",
                           "sampling", choices=SAMPLERS)
    sample_steps: int = setting(0, "steps for ddim and dpmpp (alias --steps), at most T; 0 = auto: 10 with labels, "
                                "20 without (the unconditional model needs more)", "sampling")
    sample_batch: int = setting(64, "images per sampling batch; larger batches run slower per image on a CPU",
                                "sampling")
    eta: float = setting(3.0, "fresh noise per dpmpp step: 0 = deterministic ODE, 1 = the reverse SDE (DDPM's "
                         "posterior variance), above 1 more of each step's noise is replaced, which mends malformed "
                         "strokes of a briefly trained model; ddim and inpainting take at most 1", "sampling")
    guidance: float = setting(2.5, "guidance w in eps_g + w (eps_c - eps_g), eps_g from --guide-checkpoint or the "
                              "unconditional model; 1 = the conditional model, 0 = eps_g alone", "sampling")
    guide_checkpoint: str = setting("auto", "guide with a less trained checkpoint of the same run instead of the "
                                    "unconditional model (autoguidance, Karras et al. 2024; with or without "
                                    "labels): auto = the epoch checkpoint at half the loaded one's epochs when it "
                                    "is on disk, none = classifier-free guidance, or a checkpoint path", "sampling")
    guidance_interval: tuple[float, ...] = setting((0.15, 2.0), "guide only while the noise level sigma_t = "
                                                   "sqrt((1 - alpha_bar_t) / alpha_bar_t) is in (LO, HI], the "
                                                   "conditional model elsewhere (Kynkaanniemi et al. 2024); guiding "
                                                   "the noisier steps too (0 inf) costs variety, guiding the nearly "
                                                   "clean ones below 0.15 only costs time", "sampling")
    resample: int = setting(3, "inpainting: how many times each step is made, re-noising in between so the "
                            "new pixels fit the kept ones (RePaint; 1 = once)", "sampling")
    clip_x0: bool = setting(True, "clip each predicted x0 to [-1, 1] while sampling", "sampling")
    # --- where and how it runs ---
    device: str = setting("auto", "auto picks cuda, then mps, then cpu; or any torch device name", "runtime")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)", "runtime")
    amp: str = setting("auto", "bf16 autocast: auto picks the faster of bf16 and fp32 by timing a few steps on "
                       "this CPU or GPU (cached), or force bf16 / none", "runtime", choices=AMP_MODES)
    memory_format: str = setting("auto", "the convolutions' memory format: auto times channels_last against "
                                 "contiguous (NCHW) with --amp, or force one", "runtime", choices=MEMORY_FORMATS)
    seed: int = setting(0, "seed for model init, data order and sampling noise", "runtime")
    ckpt_dir: str = setting(os.path.join("diffusion", "checkpoints"), "folder for checkpoints", "runtime")
    out_dir: str = setting(os.path.join("diffusion", "outputs"), "folder for grids, loss curve and metrics",
                           "runtime")

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.guidance_interval = tuple(map(float, self.guidance_interval))
        self.validate()

    def validate(self) -> None:
        """Reject settings that make no sense, once, with one readable line."""
        positive = ("epochs", "batch_size", "timesteps", "lr", "base_channels", "num_res_blocks",
                    "image_size", "channels", "sample_batch", "log_every", "resample")
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("limit_train", "keep_last", "sample_every", "threads", "num_classes", "weight_decay", "minutes",
                     "warmup_steps", "grad_clip", "min_snr_gamma", "guidance", "eta", "sample_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        parse_interval(self.save_every)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("amp", self.amp, AMP_MODES)
        _choice("memory_format", self.memory_format, MEMORY_FORMATS)
        _choice("logger", self.logger, LOGGERS)
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError(f"need 0 < --beta-start < --beta-end < 1, got {self.beta_start}, {self.beta_end}")
        self._validate_noise_schedule()
        if self.sample_steps > self.timesteps:
            raise UserError(f"--steps {self.sample_steps} exceeds the {self.timesteps} timesteps of the diffusion")
        if not 0 <= self.p_uncond <= 1 or not 0 <= self.ema_decay < 1 or not 0 <= self.dropout < 1:
            raise UserError("--p-uncond must be in [0, 1], --ema-decay and --dropout in [0, 1)")
        if len(self.guidance_interval) != 2 or not 0 <= self.guidance_interval[0] < self.guidance_interval[1]:
            raise UserError(f"--guidance-interval takes two noise levels LO HI with 0 <= LO < HI, got "
                            f"{show(self.guidance_interval)}")
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


# which Config groups each command takes; everything else it refuses with a reason
COMMAND_GROUPS = {
    "main": ("data", "model", "diffusion", "training", "sampling", "runtime"),
    "sampling": ("sampling", "runtime"),
    "evaluate": ("sampling", "runtime"),
}
EXTRA_FIELDS = {"evaluate": ("data_root", "download")}  # the scorecard reads real MNIST


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage wall), like every other error of these commands."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def command_fields(command: str) -> list[dataclasses.Field]:
    groups, extra = COMMAND_GROUPS[command], EXTRA_FIELDS.get(command, ())
    return [f for f in dataclasses.fields(Config) if f.metadata["group"] in groups or f.name in extra]


def build_parser(command: str, description: str) -> ArgumentParser:
    """`python -m diffusion.<command>`'s parser: one --flag per Config field the command uses, grouped, each
    with its help sentence, choices and default. Unset flags stay absent from the result."""
    parser = ArgumentParser(prog=f"python -m diffusion.{command}", description=description,
                            argument_default=argparse.SUPPRESS)
    defaults = Config()
    fields = command_fields(command)
    groups = {g: parser.add_argument_group(GROUPS[g]) for g in GROUPS if any(f.metadata["group"] == g for f in fields)}
    for f in fields:
        default, meta = getattr(defaults, f.name), f.metadata
        shown = "$DIFFUSION_DATA_ROOT or data" if f.name == "data_root" else show(default)
        kwargs = {"help": f"{meta['help']} (default: {shown})".replace("%", "%%")}  # argparse formats help with %
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", type=type(default[0]) if default else int,
                          metavar="X" if default and isinstance(default[0], float) else "N")
        else:
            kwargs["type"] = type(default)
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        groups[meta["group"]].add_argument(f"--{_flag(f.name)}", dest=f.name, **kwargs)
    parser.add_argument("--debug", action="store_true", default=False, help="show full tracebacks on errors")
    return parser


def parse_command_line(parser: ArgumentParser, command: str, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that a Config flag this command does not take is refused with the reason."""
    args, unknown = parser.parse_known_args(argv)
    usable = {f.name for f in command_fields(command)}
    for token in unknown:
        name = token.split("=")[0].removeprefix("--").removeprefix("no-").replace("-", "_")
        field_ = next((f for f in dataclasses.fields(Config) if f.name == name), None)
        if token.startswith("--") and field_ and name not in usable:
            why = ("is fixed by training; it comes from the checkpoint" if field_.metadata["trained"] else
                   f"is a {field_.metadata['group']} setting; {command} uses the checkpoint's or has no use for it")
            raise UserError(f"{token.split('=')[0]} {why}")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def trained_fields() -> tuple[str, ...]:
    """What a network is trained for: its architecture, its data's shape and its noise schedule."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["trained"])


def runtime_fields() -> tuple[str, ...]:
    """How to sample and where: taken from this version's defaults and the command line, not from the run."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["group"] in ("sampling", "runtime"))


def config_overrides(args: argparse.Namespace) -> dict:
    """The Config fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names}


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the training command line: defaults, then overrides; unknown flags exit with usage."""
    args = build_parser("main", "Train a DDPM on MNIST.").parse_args(argv)
    return Config(**config_overrides(args))


def show(value) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def markdown_table() -> str:
    """The README's configuration table, written from the fields themselves."""
    rows = ["| flag | default | group | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Config):
        shown = "$DIFFUSION_DATA_ROOT or data" if f.name == "data_root" else show(getattr(Config(), f.name))
        meaning = f.metadata["help"] + (f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else "")
        rows.append(f"| `--{_flag(f.name)}` | `{shown}` | {f.metadata['group']}"
                    f"{', *trained*' if f.metadata['trained'] else ''} | {meaning} |")
    return "\n".join(rows)


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
