"""The sampling recipe, chosen once: every rule that turns "what was asked" into "what runs" lives here.

choose_recipe takes what training fixed (ModelConfig), what was asked (SampleConfig: a field left at None was
not asked for), whether the images are labelled, the task, and the checkpoint with its epoch; it returns a
frozen Recipe, whose str() is the one line every command, the demo page and the training preview print.
generation.generate applies a Recipe and decides nothing.

The defaults below are the ones the scorecard chose (docs/results.md): autoguidance by the run's own earlier
epoch with labels, w 2.5 and eta 3, guided only at noise levels 0.4 < sigma <= 5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from diffusion.checkpoint import epoch_name
from diffusion.config import ModelConfig, SampleConfig
from diffusion.errors import UserError

TASKS = ("sample", "inpaint", "interpolate", "preview")
AUTO_STEPS = {True: 10, False: 20}  # labelled: guided digits scored no better with more; without labels 20 did
RESAMPLE = 3  # RePaint's passes per inpainting step


@dataclass(frozen=True)
class Setting:
    """The w, eta and interval that scored best for one kind of guide."""
    guidance: float
    eta: float
    interval: tuple[float, float]


# what suits each guide, when the request leaves it open
AUTOGUIDED = Setting(2.5, 3.0, (0.4, 5.0))  # labelled + an earlier epoch: sharpens without making digits alike
CLASSIFIER_FREE = Setting(2.0, 1.0, (0.15, 2.0))  # eta 3 and w 2.5 cost FD and recall with the unconditional eps
AUTOGUIDED_UNLABELLED = Setting(2.0, 1.0, (0.0, math.inf))  # without labels guiding every noise level did best
UNGUIDED = Setting(1.0, 1.0, (0.0, math.inf))


@dataclass(frozen=True)
class Recipe:
    task: str
    sampler: str
    steps: int  # network evaluations per image (all T for ddpm)
    eta: float
    guidance: float
    interval: tuple[float, float]  # guide only at noise levels sigma in (lo, hi]
    guide: Path | None  # the weaker network of autoguidance, or None
    guide_note: str  # why this guide, for the description
    labelled: bool
    learned_unconditional: bool
    null_label: int
    clip_x0: bool
    resample: int
    batch: int

    @property
    def guided(self) -> bool:
        """Whether a second prediction (weak network or unconditional eps) enters anywhere."""
        return self.guidance != 1 and (self.guide is not None or (self.labelled and self.learned_unconditional))

    def __str__(self) -> str:
        steps = f"{self.sampler}-{self.steps}" + (f":{self.eta:g}" if self.sampler != "ddpm" else "")
        if self.task == "inpaint":
            steps = f"RePaint on {self.sampler}'s {self.steps} steps, eta {self.eta:g}, resample {self.resample}"
        if self.guide is not None:
            how = f"autoguidance by {self.guide.name}, w {self.guidance:g}"
        elif self.guided:
            how = f"classifier-free guidance, w {self.guidance:g}"
        elif self.labelled:
            how = "the conditional model, no guidance"
        else:
            how = "no guidance"
        return f"{steps}, {how}{self.guide_note}" + ("" if self.labelled else ", no labels")


def choose_recipe(model: ModelConfig, asked: SampleConfig, *, task: str, labelled: bool,
                  checkpoint: Path | None = None, epoch: int | None = None) -> Recipe:
    """The recipe for `task` with a network trained as `model` (from `checkpoint`, `epoch` epochs in; None for
    an exported folder). Each rule below is applied once, in this order."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    # no labels: only a network that learned eps without a label can sample that way
    if not labelled and not model.learned_unconditional:
        raise UserError("this model was trained with --p-uncond 0, so it has no unconditional mode: drop "
                        "--unconditional, and give inpainting or interpolation a --digit")
    guide, note = find_guide(asked, task, checkpoint, epoch)
    if guide is None and labelled and not model.learned_unconditional:
        # nothing to guide with: w = 1 is the conditional model, any other w is refused
        if asked.guidance not in (None, 1.0):
            raise UserError(f"this model was trained with --p-uncond 0, so it has no unconditional eps to guide "
                            f"with; pass --guidance 1 or autoguide with --guide-checkpoint (got {asked.guidance:g})")
        best, note = UNGUIDED, " (trained with --p-uncond 0)"
    elif guide is not None:
        best = AUTOGUIDED if labelled else AUTOGUIDED_UNLABELLED
    else:
        best = CLASSIFIER_FREE if labelled else UNGUIDED
    guidance = best.guidance if asked.guidance is None else asked.guidance
    if guidance == 1 and best is not UNGUIDED:  # the conditional model alone: no guide network is needed
        guide, note = None, ""
    eta = eta_for(asked, task, best.eta)
    return Recipe(task=task, sampler=asked.sampler, steps=steps_for(asked, model, labelled), eta=eta,
                  guidance=guidance, interval=asked.guidance_interval or best.interval, guide=guide,
                  guide_note=note, labelled=labelled, learned_unconditional=model.learned_unconditional,
                  null_label=model.num_classes, clip_x0=asked.clip_x0, resample=resample_for(asked, task),
                  batch=asked.sample_batch)


def find_guide(asked: SampleConfig, task: str, checkpoint: Path | None, epoch: int | None) -> tuple[Path | None, str]:
    """(the checkpoint to autoguide with, a note on why there is none). auto: the epoch checkpoint at half the
    loaded one's epochs in the same folder (epoch_002.pth for epoch_005.pth), when it is on disk."""
    setting = asked.guide_checkpoint
    if setting == "none":
        return None, ""
    if setting != "auto":
        path = Path(setting)
        if not path.exists():
            raise UserError(f"--guide-checkpoint {setting} does not exist (auto, none, or a checkpoint path)")
        return path, ""
    if task == "preview":
        return None, " (the preview has no earlier network)"
    if checkpoint is None or epoch is None:  # an exported folder holds one network and no epoch
        return None, ""
    half = epoch // 2
    candidate = Path(checkpoint).parent / epoch_name(half)
    if half >= 1 and candidate.resolve() != Path(checkpoint).resolve() and candidate.exists():
        return candidate, ""
    return None, f" (no earlier epoch beside {Path(checkpoint).name})"


def steps_for(asked: SampleConfig, model: ModelConfig, labelled: bool) -> int:
    if asked.sampler == "ddpm":
        if asked.sample_steps is not None and asked.sample_steps != model.timesteps:
            raise UserError(f"ddpm runs all {model.timesteps} steps (Algorithm 2); --steps is for ddim and dpmpp")
        return model.timesteps
    if asked.sample_steps is not None and asked.sample_steps > model.timesteps:
        raise UserError(f"--steps {asked.sample_steps} exceeds the {model.timesteps} timesteps of the diffusion")
    return asked.sample_steps or min(AUTO_STEPS[labelled], model.timesteps)


def eta_for(asked: SampleConfig, task: str, best: float) -> float:
    """Interpolation needs the deterministic sampler, so that nearby starting noise gives nearby images. DDIM
    steps (ddim, and inpainting's) have no noise above eta 1: their largest is DDPM's posterior variance."""
    if task == "interpolate":
        if asked.eta not in (None, 0.0):
            raise UserError("interpolation needs the deterministic sampler (eta 0): with fresh noise at every step "
                            "neighbouring images would not be related; leave eta out")
        return 0.0
    ddim_steps = asked.sampler == "ddim" or task == "inpaint"
    if ddim_steps and asked.eta is not None and asked.eta > 1:
        raise UserError(f"eta {asked.eta:g} is more noise than a DDIM step has (at most 1, DDPM's posterior "
                        f"variance); {'inpainting' if task == 'inpaint' else 'ddim'} takes eta in [0, 1]")
    eta = best if asked.eta is None else asked.eta
    return min(eta, 1.0) if ddim_steps else eta


def resample_for(asked: SampleConfig, task: str) -> int:
    if asked.resample is not None and task != "inpaint":
        raise UserError("--resample is for inpainting (RePaint); give --inpaint or leave it out")
    return asked.resample or RESAMPLE
