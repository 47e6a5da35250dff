"""The settings, split by who owns them, each field carrying its help sentence, type and allowed range.

ModelConfig   what training fixes: the network's shape, the noise schedule, the labels. Checkpoints store it;
              sampling rebuilds the network from it and from nothing else.
DataConfig    which images training reads.
TrainConfig   how training runs.
SampleConfig  how images are drawn. A field left at None was not asked for: diffusion/recipe.py then picks the
              value that suits the guide, the labels and the task, so each default lives in one place.
RuntimeConfig where and how anything runs: device, precision, threads, seed, folders.

Every value, whether it comes from a flag, an exported config.json or a request to the demo page, goes through
the same check (`check_value`): its type, finiteness and range, with one readable line naming the flag.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from diffusion.diffusion_utils import final_alpha_bar
from diffusion.errors import UserError

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp")
DATASETS = ("mnist", "fashion-mnist", "folder")
AMP_MODES = ("auto", "bf16", "none")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
LOGGERS = ("none", "tensorboard")
NOISE_LEVELS = ("uniform", "lognormal", "mixed")
PREDICTIONS = ("eps", "v", "edm")
SIGMA_DATA = {"v": 1.0, "edm": 0.62}  # the data std each output mix assumes: v's is 1; MNIST's in [-1, 1] is 0.62
LOGNORMAL_SIGMA = (-0.98, 1.2)  # mean and std of ln sigma: EDM's (-1.2, 1.2) at sigma_data 0.5, moved by ln(0.62 / 0.5)
MIXED_LOGNORMAL_SHARE = 0.5  # --noise-levels mixed: the share of steps whose t is drawn log-normal
GUIDE_SETTINGS = ("auto", "none")  # or a checkpoint path
MAX_FINAL_ALPHA_BAR = 1e-2  # x_T must be this close to N(0, I): samplers start there
MAX_SEED = 2**62  # chunk k of a sampling run uses seed + k * 1_000_003, which must stay a valid 64-bit seed
MAX_IMAGES = 100_000  # per sampling command or request: a bound on the work one command line can ask for


def setting(default, help: str, *, kind: type | None = None, item: type | None = None, choices=None,
            low=None, high=None, above=None, flag: bool = True, alias: str | None = None, factory=None,
            empty: bool = False):
    """A config field that carries its own help sentence, type, allowed values and range (low <= v <= high,
    above < v). `flag=False` keeps it off the command line; `alias` is a second flag name; `empty` lets a list be
    empty (the flag given with no value)."""
    meta = {"help": help, "kind": kind or type(default if factory is None else factory()), "item": item,
            "choices": choices, "low": low, "high": high, "above": above, "flag": flag, "alias": alias,
            "empty": empty}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def show(value) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_value(f: dataclasses.Field, value, where: str = "", name: str | None = None):
    """`value` for field f if its type, finiteness and range are right (ints may stand for floats, tuples may
    arrive as JSON lists); otherwise a UserError that names the flag (or `name`), and where the value came from."""
    meta, name = f.metadata, name or flag_name(f.name)
    source = f" in {where}" if where else ""
    if value is None and f.default is None:
        return None
    if meta["kind"] is tuple:
        if not isinstance(value, (tuple, list)) or not (value or meta["empty"]):
            raise UserError(f"{name}{source} takes a list of numbers, got {value!r}")
        return tuple(_check_number(f, v, meta["item"], f"{name}{source}") for v in value)
    if meta["kind"] in (int, float):
        value = _check_number(f, value, meta["kind"], f"{name}{source}")
    elif not isinstance(value, meta["kind"]):
        raise UserError(f"{name}{source} must be {meta['kind'].__name__}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{name}{source} must be one of {', '.join(meta['choices'])}; got {value!r}")
    return value


def _check_number(f: dataclasses.Field, value, kind: type, name: str):
    meta = f.metadata
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
        raise UserError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if kind is float:
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and meta["high"] != math.inf):
            raise UserError(f"{name} must be a finite number, got {value}")
    low, high, above = meta["low"], meta["high"], meta["above"]
    if (low is not None and value < low) or (high is not None and value > high) or (above is not None and value <= above):
        bounds = " and ".join(b for b in (f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None
                                          else "", f"<= {high:g}" if high is not None else "") if b)
        raise UserError(f"{name} must be {bounds}, got {value}")
    return value


def build(cls, values: dict, where: str = "", names: dict[str, str] | None = None):
    """cls(**values) after checking each value (unknown keys are an error, like an unknown flag). names: what to
    call a field in messages, where its flag is not what the user typed (the demo page's fields)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise UserError(f"{where or cls.__name__} has an unknown setting {key!r}")
    names = names or {}
    return cls(**{k: check_value(known[k], v, where, names.get(k)) for k, v in values.items()})


class Checked:
    """Checks every field on construction, then the rules that tie fields together (`relations`)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, check_value(f, getattr(self, f.name)))
        self.relations()

    def relations(self) -> None:
        pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelConfig(Checked):
    image_size: int = setting(28, "image side in pixels, set from the dataset; must divide by P * 2**(levels - 1)",
                              low=4, high=1024)
    channels: int = setting(1, "image channels, set from the dataset", low=1, high=4)
    num_classes: int = setting(10, "labels for guidance, set from the dataset; 0 trains an unconditional model",
                               low=0, high=10_000)
    timesteps: int = setting(1000, "T, the number of noise levels", low=1, high=100_000)
    schedule: str = setting("cosine", "betas: cosine (Nichol & Dhariwal 2021) or linear (Ho et al.)",
                            choices=SCHEDULES)
    beta_start: float = setting(1e-4, "first beta of the linear schedule at T = 1000 (scaled by 1000 / T)",
                                above=0, high=1)
    beta_end: float = setting(0.02, "last beta of the linear schedule at T = 1000 (scaled by 1000 / T)",
                              above=0, high=1)
    prediction: str = setting("eps", "what the network outputs, always read back as eps: eps (Ho et al.), v = "
                              "sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022), or edm (Karras et "
                              "al. 2022: the input scaled to unit variance, the output a mix of x0 and eps for data "
                              "of std 0.62); each is trained on its own target with unit weight", choices=PREDICTIONS)
    patch_size: int = setting(2, "the U-Net sees the image as a map of P x P pixel patches (pixel-unshuffle), so "
                              "no convolution runs at full resolution; 1 = every pixel (the paper's network)",
                              low=1, high=8)
    base_channels: int = setting(32, "U-Net width at its first level, where convolutions cost the most; "
                                 "a multiple of 8", low=8, high=1024)
    channel_mults: tuple = setting(None, "width multipliers per level (1 1 = 32/32 at 14/7 with 2 x 2 patches)",
                                   item=int, low=1, high=16, factory=lambda: (1, 1))
    num_res_blocks: int = setting(1, "residual blocks per level; one is faster than two at equal quality here",
                                  low=1, high=8)
    attention_resolutions: tuple = setting(None, "resolutions whose levels also have self-attention; the middle "
                                           "block always has it (the flag with no number: only the middle)",
                                           item=int, low=1, high=1024, factory=lambda: (7,), empty=True)
    level_skips: bool = setting(True, "the up path also takes each downsampling's output as a skip, with one more "
                                "block at each lower level than the way down (Ho et al.); --no-level-skips: as many "
                                "blocks up as down there, a cheaper step and less precise digits")
    stem_skip: bool = setting(True, "the up path also takes the stem's output as a skip, with one more block at the "
                              "first level (Ho et al.); --no-stem-skip: as many blocks up as down there, the costliest "
                              "level, a cheaper step and less precise digits")
    attention_heads: int = setting(1, "heads per self-attention layer, each must split its layer's channels evenly; "
                                   "one, as Ho et al., draws as well as four on MNIST and runs faster on a CPU",
                                   low=1, high=1024)
    learned_unconditional: bool = setting(True, "whether the network also learned eps without a label (p_uncond "
                                          "> 0 or no labels): classifier-free guidance and --unconditional need it",
                                          flag=False)

    def relations(self) -> None:
        defaults = (ModelConfig.beta_start, ModelConfig.beta_end)
        if self.schedule != "linear" and (self.beta_start, self.beta_end) != defaults:
            raise UserError(f"--beta-start and --beta-end shape the linear schedule only; add --schedule linear "
                            f"(the schedule here is {self.schedule})")
        if not self.beta_start < self.beta_end:
            raise UserError(f"need --beta-start < --beta-end, got {self.beta_start}, {self.beta_end}")
        if len(self.channel_mults) > 6:
            raise UserError(f"--channel-mults takes at most 6 levels, got {len(self.channel_mults)}")
        if self.base_channels % 8:
            raise UserError(f"--base-channels must be a multiple of 8 (GroupNorm groups), got {self.base_channels}")
        attention_widths = {self.base_channels * self.channel_mults[-1]} | {
            self.base_channels * m for level, m in enumerate(self.channel_mults)
            if self.image_size // self.patch_size // 2 ** level in self.attention_resolutions}
        uneven = sorted(w for w in attention_widths if w % self.attention_heads)
        if uneven:
            raise UserError(f"--attention-heads {self.attention_heads} must split every attention layer's channels "
                            f"evenly; {uneven[0]} channels do not split into {self.attention_heads} heads")
        factor = self.patch_size * 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise UserError(f"--image-size {self.image_size} must divide by {factor}, the U-Net's "
                            f"downsampling factor for {self.patch_size} x {self.patch_size} patches and "
                            f"{len(self.channel_mults)} levels")
        self._check_noise_schedule()

    def _check_noise_schedule(self) -> None:
        """Every sampler starts from N(0, I), so the forward process must actually end there."""
        scale = 1000 / self.timesteps  # linear betas are scaled to T, see diffusion_utils.linear_betas
        if self.schedule == "linear" and self.beta_end * scale >= 1:
            raise UserError(f"--timesteps {self.timesteps} is too few for the linear schedule: its last beta would "
                            f"be {self.beta_end * scale:.2f} >= 1; use at least {math.floor(self.beta_end * 1000) + 1}")
        left = final_alpha_bar(self.schedule, self.timesteps, self.beta_start, self.beta_end)
        if left > MAX_FINAL_ALPHA_BAR:
            raise UserError(f"this noise schedule leaves alpha_bar_T = {left:.3g} of the signal at t = T, so x_T is "
                            f"not pure noise (need <= {MAX_FINAL_ALPHA_BAR}); raise --beta-end or --timesteps")


@dataclass(frozen=True)
class DataConfig(Checked):
    dataset: str = setting("mnist", "which images to train on: MNIST, Fashion-MNIST, or an ImageFolder tree "
                           "(one sub-folder per class) at --data-root", choices=DATASETS)
    data_root: str = setting(None, "folder holding MNIST/raw (or FashionMNIST/raw, or the ImageFolder tree)",
                             factory=lambda: os.environ.get("DIFFUSION_DATA_ROOT", "data"))
    download: bool = setting(True, "download MNIST / Fashion-MNIST into --data-root when missing (needs internet)")
    limit_train: int = setting(0, "train on the first N images only, for quick runs (0 = all)", low=0, high=10**9)


@dataclass(frozen=True)
class TrainConfig(Checked):
    epochs: int = setting(5, "passes over the training set", low=1, high=100_000)
    minutes: float = setting(0.0, "train for this many minutes instead of --epochs, with the learning rate "
                             "decaying to zero when they are spent (0 = use --epochs)", low=0, high=525_600)
    batch_size: int = setting(128, "images per step, split across processes under torchrun", low=1, high=65_536)
    lr: float = setting(3e-3, "AdamW peak learning rate; high because the network is small", above=0, high=10)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0, high=10)
    warmup_steps: int = setting(200, "steps of linear learning-rate warm-up, then cosine decay to zero",
                                low=0, high=10**9)
    noise_levels: str = setting("uniform", "how training draws t: uniform (Algorithm 1), lognormal, ln sigma_t ~ "
                                "N(-0.98, 1.2^2), EDM's choice for data of std 0.5 moved to MNIST's 0.62 in [-1, 1], "
                                "or mixed, each step's t uniform or lognormal with even odds",
                                choices=NOISE_LEVELS)
    stratified_t: bool = setting(False, "draw each batch's t together, spread evenly over the noise levels, so every "
                                 "step trains all of them (the loss keeps its expectation, with less noise); off, "
                                 "each image's t is drawn on its own, as in Algorithm 1")
    min_snr_gamma: float = setting(0.0, "weigh each t's loss by min(SNR_t, gamma) / SNR_t (Min-SNR, Hang et al. "
                                   "2023); 0 = the paper's unweighted L_simple", low=0, high=1e6)
    grad_clip: float = setting(1.0, "maximum gradient norm (0 = no clipping)", low=0, high=1e12)
    ema_length: float = setting(0.0, "the weights' average that sampling uses: a power-function EMA of this "
                                "relative length sigma_rel (Karras et al. 2024), which scales with the run; 0 = "
                                "the exponential EMA of --ema-decay", low=0, high=0.5)
    ema_decay: float = setting(0.999, "with --ema-length 0: decay of the exponential EMA, warmed up as "
                               "min(decay, (1 + n) / (10 + n))", low=0, high=0.999999)
    ema_lengths: tuple = setting(None, "also keep power-function EMAs of the weights (Karras et al. 2024) of these "
                                 "relative lengths sigma_rel, like 0.05 0.1, in every checkpoint, to choose the EMA "
                                 "after training (bench/ema.py)", kind=tuple, item=float, above=0, high=0.5)
    p_uncond: float = setting(0.1, "chance of replacing a label by 'no label', so one network also learns the "
                              "unconditional model that guidance needs", low=0, high=1)
    dropout: float = setting(0.0, "dropout in the residual blocks; a few epochs do not overfit 60k digits",
                             low=0, high=0.99)
    compile: bool = setting(False, "torch.compile the U-Net (pays on CUDA; slow to start on a CPU)")
    log_every: int = setting(25, "steps between progress-bar and loss-curve updates (each reads the loss: a sync)",
                             low=1, high=10**9)
    save_every: str = setting("5min", "also checkpoint every N minutes (5min) or steps (200steps) inside an "
                              "epoch; 0 = only at epoch ends")
    keep_last: int = setting(0, "keep only the newest K checkpoints, epoch and timed (0 = keep all)",
                             low=0, high=10**6)
    sample_every: int = setting(1, "epochs between preview grids in --out-dir (0 = never)", low=0, high=10**6)
    logger: str = setting("none", "also log the loss, learning rate and preview grids for TensorBoard, in "
                          "OUT_DIR/tensorboard (pip install -e \".[tensorboard]\")", choices=LOGGERS)

    def relations(self) -> None:
        parse_interval(self.save_every)


@dataclass(frozen=True)
class SampleConfig(Checked):
    sampler: str = setting("dpmpp", "ddpm (all T steps, Algorithm 2), ddim, or dpmpp (DPM-Solver++(2M))",
                           choices=SAMPLERS)
    sample_steps: int = setting(None, "network evaluations for ddim and dpmpp, at most T (auto: 10 with labels, "
                                "20 without)", kind=int, low=1, high=100_000, alias="--steps")
    sample_batch: int = setting(64, "images per sampling batch; larger batches run slower per image on a CPU",
                                low=1, high=4096)
    eta: float = setting(None, "fresh noise per step: 0 = deterministic, 1 = the reverse SDE (DDPM's posterior "
                         "variance), above 1 (dpmpp only) more of each step's noise is replaced (auto: 3 "
                         "autoguided with labels, 1 otherwise, 0 for interpolation)", kind=float, low=0, high=100)
    guidance: float = setting(None, "guidance w in eps_g + w (eps_c - eps_g), eps_g from the guide network or the "
                              "unconditional model; 1 = the conditional model, 0 = eps_g alone (auto: 2.5 "
                              "autoguided with labels, 2 otherwise)", kind=float, low=0, high=100)
    guide_checkpoint: str = setting("auto", "what guides: auto = autoguidance (Karras et al. 2024) by the epoch "
                                    "checkpoint at half the loaded one's epochs when it is on disk, else "
                                    "classifier-free guidance; none = classifier-free guidance; or a checkpoint "
                                    "path: any network trained on the same diffusion and labels, e.g. a smaller one")
    guidance_interval: tuple = setting(None, "guide only while the noise level sigma_t = sqrt((1 - alpha_bar_t) / "
                                       "alpha_bar_t) is in (LO, HI], the conditional model elsewhere "
                                       "(Kynkaanniemi et al. 2024) (auto: 0.4 5 autoguided, 0.15 2 classifier-free, "
                                       "0 inf without labels)",
                                       kind=tuple, item=float, low=0, high=math.inf)
    resample: int = setting(None, "inpainting: how many times each step is made, re-noising in between so the new "
                            "pixels fit the kept ones (RePaint; auto: 3)", kind=int, low=1, high=100)
    clip_x0: bool = setting(True, "clip each predicted x0 to [-1, 1] while sampling")

    def relations(self) -> None:
        interval = self.guidance_interval
        if interval is not None and (len(interval) != 2 or not interval[0] < interval[1]):
            raise UserError(f"--guidance-interval takes two noise levels LO HI with 0 <= LO < HI, got {show(interval)}")


@dataclass(frozen=True)
class RuntimeConfig(Checked):
    device: str = setting("auto", "auto picks cuda, then mps, then cpu; or any torch device name")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)", low=0, high=1024)
    amp: str = setting("auto", "bf16 autocast: auto picks the faster of bf16 and fp32 by timing a few steps on "
                       "this CPU or GPU (cached), or force bf16 / none", choices=AMP_MODES)
    memory_format: str = setting("auto", "the convolutions' memory format: auto times channels_last against "
                                 "contiguous (NCHW) with --amp, or force one", choices=MEMORY_FORMATS)
    seed: int = setting(0, "seed for model init, data order and sampling noise", low=0, high=MAX_SEED)
    ckpt_dir: str = setting(os.path.join("diffusion", "checkpoints"), "folder for checkpoints")
    out_dir: str = setting(os.path.join("diffusion", "outputs"), "folder for grids, loss curve and metrics")


# `main --paper`: Ho et al.'s DDPM as this project first trained it: no labels, eps-prediction, uniform t, L_simple,
# the linear betas, a U-Net that sees every pixel (32/64/64 at 28/14/7), 2 epochs. Flags given beside --paper
# still win.
PAPER = {"num_classes": 0, "schedule": "linear", "prediction": "eps", "patch_size": 1, "base_channels": 32,
         "channel_mults": (1, 2, 2), "attention_heads": 4, "level_skips": True, "stem_skip": True,
         "noise_levels": "uniform", "stratified_t": False, "lr": 2e-3,
         "epochs": 2}


def as_flags(values: dict) -> list[str]:
    """The command-line words that set these fields to these values."""
    words = []
    for name, value in values.items():
        if isinstance(value, bool):
            words.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        else:
            words += [flag_name(name), *show(value).split()]
    return words


def paper_flags() -> list[str]:
    return as_flags(PAPER)


PARTS = {ModelConfig: "model: the U-Net and its noise schedule (fixed by training)", DataConfig: "data",
         TrainConfig: "training", SampleConfig: "sampling (the training preview uses it too)",
         RuntimeConfig: "where and how it runs"}


def learns_unconditional(num_classes: int, p_uncond: float) -> bool:
    """Whether training teaches the network eps without a label: always without labels, else when labels are dropped."""
    return num_classes == 0 or p_uncond > 0


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as --help and docs/configuration.md show it."""
    return "$DIFFUSION_DATA_ROOT or data" if f.name == "data_root" else show(default_of(f)) or "none"


def fields_of(*parts) -> list[tuple[type, dataclasses.Field]]:
    return [(part, f) for part in parts for f in dataclasses.fields(part) if f.metadata["flag"]]


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
            if 0 < amount < 1e9:
                return amount, unit
    raise UserError(f"--save-every takes minutes or steps, like 5min or 200steps (0 = only at epoch ends); got {text!r}")


def markdown_table() -> str:
    """docs/configuration.md's table, written from the fields themselves."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for part, title in PARTS.items():
        rows.append(f"| **{title}** | | |")
        for _, f in fields_of(part):
            meaning = f.metadata["help"] + (f" ({', '.join(f.metadata['choices'])})" if f.metadata["choices"] else "")
            alias = f" (`{f.metadata['alias']}`)" if f.metadata["alias"] else ""
            rows.append(f"| `{flag_name(f.name)}`{alias} | `{shown_default(f)}` | {meaning} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is given, by owner (the training preview samples with `sample`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def configuration_page() -> str:
    """docs/configuration.md, whole."""
    return ("# Configuration\n\nEvery setting of every command, written from the fields in `diffusion/config.py` "
            "(regenerate with\n`python -c \"import diffusion.config as c; print(c.configuration_page(), end='')\" > "
            "docs/configuration.md`).\nA command takes the parts it uses and refuses the others' flags with the reason: "
            "`main` takes all of them,\n`sampling`, `evaluate` and `demo` take sampling and runtime settings, "
            "`export` only `--ckpt-dir`.\nSampling settings shown as `auto` are chosen by `diffusion/recipe.py` for "
            "the guide, the labels and the task.\n\n" + markdown_table() + "\n")
