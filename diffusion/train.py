"""The training loop: Algorithm 1 with AdamW, warm-up, gradient clipping, EMA, and safe checkpoints."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from diffusion.autotune import setup_runtime
from diffusion.checkpoint import (FORMAT, check_room, check_same_model, check_writable_folder, epoch_name,
                                  find_latest, load_checkpoint, load_weights, model_config, save_checkpoint)
from diffusion.config import LOGNORMAL_SIGMA, MIXED_LOGNORMAL_SHARE, RunConfig, learns_unconditional, parse_interval
from diffusion.dataloader import batches, dataset_shape, epoch_order, load_images, num_batches
from diffusion.diffusion_utils import (diffusion_loss, lognormal_t_probs, min_snr_weights, mix_with_uniform,
                                      schedule_from_config, target_weights)
from diffusion.errors import UserError, writing
from diffusion.generation import generate, sample_labels
from diffusion.ema import EmaTracks, beta, gamma_of
from diffusion.logger import make_logger
from diffusion.model import build_model, output_coefficients
from diffusion.recipe import choose_recipe
from diffusion.runtime import resolve_device
from diffusion.visuals import save_grid, save_loss_curve


def ema_multi_avg_fn(decay: float, length: float = 0.0):
    """The EMA's update on whole parameter lists, no host sync. n_averaged updates came before this one (the first
    copies the weights): with a length, the power-function EMA's beta at step n_averaged + 1 (diffusion/ema.py);
    else decay_n = min(decay, (1 + n) / (10 + n)), an exponential EMA with warm-up."""
    gamma = gamma_of(length) if length else None

    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        if gamma is None:
            d = torch.clamp((1 + n_averaged) / (10 + n_averaged), max=decay)
        else:
            d = beta(n_averaged + 1, gamma)
        torch._foreach_lerp_(ema_params, params, (1 - d).to(params[0].dtype))  # one pass, no temporaries
    return update


def lr_lambda(warmup: int, total: int):
    """Linear warm-up to the peak learning rate, then cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def lr_lambda_budget(warmup: int, run: "TrainingRun"):
    """Warm-up by steps, then cosine decay in training time, reaching zero when --minutes is spent."""
    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, run.trained_seconds / run.budget)))
    return factor


class StopFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}

    def _set(self, signum, _frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def setup_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.runtime.device)
    if world == 1:
        return 0, 1, device
    if cfg.train.batch_size % world:
        raise UserError(f"--batch-size {cfg.train.batch_size} must divide by the {world} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingRun:
    """Everything a training run owns: model, EMA, optimizer, schedule, data and counters."""

    def __init__(self, cfg: RunConfig, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 model: torch.nn.Module | None = None, resume: Path | None = None):
        """`model` replaces the config's U-Net (any net with eps = net(x, t, labels)); the benchmarks use it.
        `resume`, a checkpoint to continue, is read and checked against the config here; load() applies it."""
        self.rank, self.world = rank, world
        self.device = device or resolve_device(cfg.runtime.device)
        self.images, self.labels = load_images(cfg.data, train=True, image_size=cfg.model.image_size)
        shape = dataset_shape(self.images, self.labels)
        if cfg.model.num_classes == 0:  # unconditional training stays available
            shape["num_classes"] = 0
        shape["learned_unconditional"] = learns_unconditional(shape["num_classes"], cfg.train.p_uncond)
        self.cfg = cfg = cfg.replace(model=cfg.model.replace(**shape))
        # a checkpoint of another network is refused before the precision timing and any step
        self.resume_path, self.resumed = resume, None
        if resume is not None:
            self.resumed = load_checkpoint(resume, self.device)
            check_same_model(model_config(self.resumed, resume), cfg.model, resume)
        # the preview's recipe, chosen now: a setting it refuses stops the run before any training
        self.preview_recipe = choose_recipe(cfg.model, cfg.sample, task="preview", labelled=cfg.model.num_classes > 0)
        self.preview_runtime = None
        self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        torch.manual_seed(cfg.runtime.seed)
        self.model = (model or build_model(cfg.model, cfg.train.dropout)).to(self.device)
        self.runtime = setup_runtime(cfg.runtime, cfg.model, self.model, "train", min(cfg.train.batch_size, 64),
                                     device=self.device, world=world, verbose=rank == 0)
        self.model = self.runtime.prepare(self.model)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(cfg.train.ema_decay, cfg.train.ema_length))
        self.ema.requires_grad_(False)
        self.ema_tracks = EmaTracks(self.model, cfg.train.ema_lengths)
        self.wrapped_model = self.model  # what the step calls: the model, or DDP / torch.compile around it
        if world > 1:
            self.wrapped_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eager_model = self.wrapped_model  # for the epoch's shorter last batch: see train_step
        if cfg.train.compile:
            self.wrapped_model = torch.compile(self.wrapped_model)
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **fused)
        self.steps_per_epoch = num_batches(len(self.epoch_order(0)), cfg.train.batch_size // world)
        self.budget = 60 * cfg.train.minutes  # seconds of training; 0 = train for cfg.train.epochs
        self.trained_seconds, self.clock = 0.0, time.monotonic()  # training time, summed over resumed sessions
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda_budget(cfg.train.warmup_steps, self) if self.budget else
            lr_lambda(cfg.train.warmup_steps, cfg.train.epochs * self.steps_per_epoch))
        self.schedule = schedule_from_config(cfg.model).to(self.device)
        self.loss_weights = loss_weights(cfg, self.schedule)
        self.t_probs = training_t_probs(cfg, self.device)
        self.gen = torch.Generator(self.device).manual_seed(cfg.runtime.seed * 1000 + rank)  # t, noise, label drops
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.epoch_loss = torch.zeros((), device=self.device)
        self.history: list[dict] = []  # one record per epoch
        self.curve: list[list[float]] = []  # [step, loss] at every progress-bar update
        self.save_interval = parse_interval(cfg.train.save_every)
        self.logger = make_logger(cfg.train.logger, cfg.runtime.out_dir, rank)
        self.saved_at = time.monotonic()

    def tick(self) -> None:
        """Add the time since the last tick to the training time (what --minutes budgets)."""
        now = time.monotonic()
        self.trained_seconds += now - self.clock
        self.clock = now

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.images), self.cfg.runtime.seed, epoch, self.rank, self.world, self.cfg.train.batch_size)

    # --- checkpoints ---
    def state(self) -> dict:
        self.tick()  # the training time up to this moment goes into the checkpoint
        return {"model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
                "ema_n": self.ema.n_averaged, "ema_tracks": self.ema_tracks.state_dict(),
                "optimizer": self.opt.state_dict(),
                "lr_schedule": self.lr_scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "epoch_loss": self.epoch_loss,
                "generator": self.gen.get_state(), "rng": rng_state(), "history": self.history,
                "curve": self.curve, "trained_seconds": self.trained_seconds, "format": FORMAT,
                "model_config": self.cfg.model.to_dict(), "train_config": self.cfg.train.to_dict(),
                "data_config": self.cfg.data.to_dict()}

    def load(self) -> None:
        """Continue from the checkpoint given as `resume` (read and checked when the run was made)."""
        state, path = self.resumed, self.resume_path
        load_weights(self.model, state["model"], path)
        load_weights(self.ema.module, state["ema"], path)
        try:
            self.ema.n_averaged.copy_(state["ema_n"])
            self.ema_tracks.load_state_dict(state["ema_tracks"] if self.ema_tracks.tracks else {})
            self.opt.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_schedule"])
            self.gen.set_state(state["generator"].cpu())
            set_rng_state(state["rng"])
            self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
            self.epoch_loss = state["epoch_loss"].to(self.device)
            self.history, self.curve = state["history"], state.get("curve", [])
            self.trained_seconds = state.get("trained_seconds", 0.0)
        except (KeyError, ValueError, RuntimeError) as err:
            raise UserError(f"{path} cannot resume training (it lacks or mismatches optimizer state: {err})") from None
        self.resumed = None  # what it held now lives in the model, the optimizer and the counters

    def save(self, name: str) -> Path:
        """Write a checkpoint unless the weights went non-finite (then the last good one stays `latest`)."""
        path = Path(self.cfg.runtime.ckpt_dir) / name
        if not weights_finite(self.model, self.ema.module):
            raise UserError(f"the weights became non-finite by step {self.step}; not saving {path.name}. "
                            f"Last good checkpoint: {_describe_latest(self.cfg.runtime.ckpt_dir)}. Try a lower --lr")
        save_checkpoint(self.state(), path, self.cfg.train.keep_last if name.startswith(("epoch_", "step_")) else 0)
        self.saved_at = time.monotonic()
        return path

    # --- one step of Algorithm 1 ---
    def train_step(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x0 = self.runtime.batch(x0)
        if cfg.model.num_classes:  # drop labels to "no label" so one net learns both eps_c and eps_u
            drop = torch.rand(y.shape, device=y.device, generator=self.gen) < cfg.train.p_uncond
            y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)
        # A compiled model meeting a new batch size recompiles (70 s on an H100 for 60000 % 128 = 96 images),
        # longer than the eager model takes for that one batch.
        net = self.wrapped_model if len(x0) == cfg.train.batch_size // self.world else self.eager_model
        with self.runtime.autocast():
            loss = diffusion_loss(lambda xt, t: net(xt, t, y if cfg.model.num_classes else None),
                                  x0, self.schedule, self.gen, self.loss_weights, self.t_probs,
                                  cfg.train.stratified_t)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:  # 0 means no clipping (clip_grad_norm_ would scale every gradient to zero)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
        self.opt.step()
        self.lr_scheduler.step()
        self.ema.update_parameters(self.model)
        self.ema_tracks.update(self.step + 1)
        return loss.detach()


def loss_weights(cfg: RunConfig, schedule) -> torch.Tensor | None:
    """Per-t weights on the eps loss: Min-SNR's when asked (it is defined on x_0's error, so it is the same for every
    --prediction), else those that make it the unweighted loss on the network's own target; None for L_simple."""
    if cfg.train.min_snr_gamma:
        return min_snr_weights(schedule, cfg.train.min_snr_gamma)
    coefficients = output_coefficients(cfg.model)
    return None if coefficients is None else target_weights(coefficients[2]).float().to(schedule.alpha_bar.device)


def training_t_probs(cfg: RunConfig, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """P(t) for the training steps as --noise-levels asks; None for uniform t. Made on the CPU in float64, which
    Apple's MPS lacks, then moved."""
    if cfg.train.noise_levels == "uniform":
        return None
    probs = lognormal_t_probs(schedule_from_config(cfg.model), *LOGNORMAL_SIGMA)
    probs = probs if cfg.train.noise_levels == "lognormal" else mix_with_uniform(probs, MIXED_LOGNORMAL_SHARE)
    return probs.to(device)


def weights_finite(*modules: torch.nn.Module) -> bool:
    """True when every floating-point weight and buffer is finite (one host sync)."""
    flags = [torch.isfinite(v).all() for m in modules for v in m.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(flags).all())


def all_reduce_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def train_one_epoch(run: TrainingRun, stop: StopFlag) -> str:
    """Train the rest of the current epoch. Returns 'done', 'signal' when SIGINT/SIGTERM asked to stop, or
    'budget' when --minutes is spent (the caller saves the state)."""
    cfg = run.cfg
    order = run.epoch_order(run.epoch)
    bad_step = torch.full((), -1, device=run.device)  # first step with a non-finite loss, kept on device
    bar = tqdm(batches(run.images, run.labels, order, cfg.train.batch_size // run.world, run.batch_in_epoch),
               total=run.steps_per_epoch, initial=run.batch_in_epoch, disable=run.rank != 0,
               desc=f"epoch {run.epoch + 1}" + (f" ({cfg.train.minutes:g} min budget)" if run.budget else f"/{cfg.train.epochs}"),
               unit="batch", dynamic_ncols=True)
    for x0, y in bar:
        run.tick()
        loss = run.train_step(x0, y)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), run.step, bad_step)
        run.epoch_loss += loss
        run.step += 1
        run.batch_in_epoch += 1
        if run.step % cfg.train.log_every == 0 or run.batch_in_epoch == run.steps_per_epoch:
            # a host sync point: read the loss, check for NaN and for a stop signal from any rank
            check_finite(bad_step, run)
            run.curve.append([run.step, loss.item()])
            bar.set_postfix(loss=f"{run.curve[-1][1]:.4f}", lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
            run.logger.scalars(run.step, {"train/loss": run.curve[-1][1], "train/lr": run.lr_scheduler.get_last_lr()[0]})
        if snapshot_due(run):
            check_finite(bad_step, run)
            run.save(f"step_{run.step:08d}.pth")
        if stop_requested(stop, run):
            return "signal"
        if budget_spent(run):
            check_finite(bad_step, run)
            return "budget"
    check_finite(bad_step, run)
    return "done"


def budget_spent(run: TrainingRun) -> bool:
    """Whether --minutes of training time have passed; ranks agree at sync points, like stop_requested."""
    if not run.budget:
        return False
    run.tick()
    if run.world == 1:
        return run.trained_seconds >= run.budget
    if run.step % run.cfg.train.log_every:
        return False
    flag = torch.tensor(float(run.trained_seconds >= run.budget), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() != 0


def snapshot_due(run: TrainingRun) -> bool:
    """Whether --save-every asks for a checkpoint now (never right before the epoch's own checkpoint)."""
    amount, unit = run.save_interval
    if run.rank != 0 or unit == "off" or run.batch_in_epoch == run.steps_per_epoch:
        return False
    if unit == "steps":
        return run.step % amount == 0
    return time.monotonic() - run.saved_at >= 60 * amount


def stop_requested(stop: StopFlag, run: TrainingRun) -> bool:
    if run.world == 1:
        return stop.signum != 0
    if run.step % run.cfg.train.log_every:  # ranks agree only at sync points, so all stop at the same step
        return False
    flag = torch.tensor(float(stop.signum), device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() != 0


def check_finite(bad_step: torch.Tensor, run: TrainingRun) -> None:
    step = int(bad_step.item())
    if step >= 0:
        last = _describe_latest(run.cfg.runtime.ckpt_dir)
        raise UserError(f"loss became non-finite at step {step + 1} (epoch {run.epoch + 1}); stopped without "
                        f"saving. Last good checkpoint: {last}. Try a lower --lr or --grad-clip")


def _describe_latest(ckpt_dir: str) -> str:
    return str(find_latest(Path(ckpt_dir)) or "none yet")


def end_of_epoch(run: TrainingRun, seconds: float, images_seen: int) -> None:
    """Print and log the epoch's mean loss, save its checkpoint and pictures (rank 0 only writes)."""
    mean_loss = all_reduce_sum(run.epoch_loss.clone(), run.world).item() / (run.steps_per_epoch * run.world)
    run.epoch += 1
    run.batch_in_epoch = 0
    run.epoch_loss.zero_()
    record = {"epoch": run.epoch, "step": run.step, "loss": round(mean_loss, 6),
              "lr": run.lr_scheduler.get_last_lr()[0], "seconds": round(seconds, 2),
              "images_per_s": round(images_seen / seconds, 1)}
    run.history.append(record)
    if run.rank != 0:
        return
    path = run.save(epoch_name(run.epoch))
    of_total = "" if run.budget else f"/{run.cfg.train.epochs}"
    tqdm.write(f"epoch {run.epoch}{of_total}  mean loss {mean_loss:.4f}  "
               f"{record['images_per_s']:.0f} images/s  {seconds:.0f}s  -> {path}")
    with writing(f"the epoch's pictures in {run.cfg.runtime.out_dir}", f"; {path} is saved: make room, then --resume"):
        write_pictures(run, record)


def end_of_budget(run: TrainingRun) -> None:
    """--minutes spent, usually mid-epoch: save final.pth (what `latest` then names) and its pictures."""
    if run.rank != 0:
        return
    path = run.save("final.pth")
    tqdm.write(f"time budget of {run.cfg.train.minutes:g} min spent at step {run.step} (epoch {run.epoch + 1}, "
               f"{run.batch_in_epoch}/{run.steps_per_epoch} batches) -> {path}")
    out = Path(run.cfg.runtime.out_dir)
    if run.cfg.train.sample_every:
        with writing(out / "final.png", f"; {path} is saved"):
            save_grid(preview_samples(run), out / "final.png", nrow=run.cfg.model.num_classes or 10)


def write_pictures(run: TrainingRun, record: dict) -> None:
    out = Path(run.cfg.runtime.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.logger.scalars(run.step, {"epoch/mean_loss": record["loss"], "epoch/images_per_s": record["images_per_s"]})
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    save_loss_curve(run.history, run.curve, out / "loss_curve.png")
    if run.cfg.train.sample_every and run.epoch % run.cfg.train.sample_every == 0:
        preview = preview_samples(run)
        save_grid(preview, out / f"epoch_{run.epoch:03d}.png", nrow=run.cfg.model.num_classes or 10)
        run.logger.image("preview", preview, run.step)


PREVIEW_SEED = 1234


def preview_samples(run: TrainingRun) -> torch.Tensor:
    """A fixed-seed set from the EMA weights: the images of `python -m diffusion.sampling --all-digits
    --num-images 2 --seed 1234 --guide-checkpoint none` (20 without labels), shown one column per class."""
    model = run.cfg.model
    labels = sample_labels(model, 2, all_digits=True) if model.num_classes else None
    n = 20 if labels is None else len(labels)
    if run.preview_runtime is None:
        run.preview_runtime = setup_runtime(run.cfg.runtime, model, run.ema.module, "sample",
                                            min(run.preview_recipe.batch, n), device=run.device, verbose=False)
    x = generate(run.ema.module, model, run.preview_recipe, n, labels, run.preview_runtime, seed=PREVIEW_SEED,
                 progress=False)
    if labels is None:
        return x
    return x.view(model.num_classes, 2, *x.shape[1:]).transpose(0, 1).reshape(x.shape)  # row k: the k-th of each


def train(cfg: RunConfig, resume: str | None = None) -> TrainingRun:
    """Train for cfg.train.epochs, resuming from a checkpoint path or 'latest' when asked."""
    for folder, what in ((cfg.runtime.ckpt_dir, "--ckpt-dir"), (cfg.runtime.out_dir, "--out-dir")):
        check_writable_folder(Path(folder), what)  # before any step is spent
    rank, world, device = setup_distributed(cfg)
    path = find_latest(Path(cfg.runtime.ckpt_dir)) if resume == "latest" else Path(resume) if resume else None
    run = TrainingRun(cfg, rank, world, device, resume=path)
    if rank == 0:
        check_room(Path(cfg.runtime.ckpt_dir), run.model, "--ckpt-dir")
    if path:
        run.load()
        if rank == 0:
            print(f"resumed from {path} at epoch {run.epoch}, step {run.step}")
    elif resume and rank == 0:
        print(f"nothing to resume in {cfg.runtime.ckpt_dir}: starting a fresh run")
    stop = StopFlag()
    run.clock = time.monotonic()  # time spent loading and resuming is not training time
    try:
        while (run.trained_seconds < run.budget) if run.budget else (run.epoch < run.cfg.train.epochs):
            t0, done_before = time.perf_counter(), run.batch_in_epoch
            ended = train_one_epoch(run, stop)
            if ended == "signal":
                if rank == 0:
                    path = run.save("interrupted.pth")
                    print(f"\nstopped by {signal.Signals(stop.signum).name}: saved {path} "
                          f"(epoch {run.epoch + 1}, step {run.step}); continue with --resume")
                raise SystemExit(128 + stop.signum)
            if ended == "budget":
                end_of_budget(run)
                break
            seen = min((run.steps_per_epoch - done_before) * cfg.train.batch_size, len(run.images))
            end_of_epoch(run, time.perf_counter() - t0, seen)
    finally:
        stop.restore()
        run.logger.close()
        if world > 1:
            dist.destroy_process_group()
    return run
