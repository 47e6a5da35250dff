"""Pick bf16 or fp32 and the convolutions' memory format by timing the actual model on this machine.

Which is fastest depends on the machine: bf16 autocast trained 1.6x faster than fp32 on one 2-core AMD EPYC
and 1.9x slower on one Intel Xeon, channels_last helps some CPUs by 10% and slows others, and on an H100 the
small default U-Net trained faster in fp32 than in bf16 (its step is bound by kernel launches, which
autocast's casts add to). So with --amp auto / --memory-format auto on a CPU or a CUDA GPU, a few steps of
each candidate are timed at start-up, the fastest wins, and the answer is cached per CPU or GPU model, the CPU's
vector instructions (a bf16 step on a CPU without native bf16 is emulated), torch version, threads and model
configuration. setup_runtime is the one place where training and sampling get their Runtime.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffusion.diffusion_utils import diffusion_loss, schedule_from_config
from diffusion.runtime import Precision, Runtime, resolve_device

clock = time.perf_counter
# what decides the speed of a step, besides the machine
SPEED_FIELDS = ("image_size", "channels", "num_classes", "patch_size", "base_channels", "channel_mults",
                "num_res_blocks", "attention_resolutions", "attention_heads", "level_skips", "stem_skip")


def setup_runtime(cfg, model_cfg, model: torch.nn.Module, purpose: str, batch: int, *,
                  device: torch.device | None = None, world: int = 1, verbose: bool = True) -> Runtime:
    """The Runtime for `purpose` ('train' or 'sample') of `model`: the device (given, or from --device), threads,
    TF32 on CUDA, and bf16 / memory format timed on this machine. The ranks of a torchrun job would time
    differently, so they take the first candidate instead of measuring."""
    device = device or resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":  # TF32 matmuls and convolutions: ~free speed, ample precision for this network
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        return Runtime(device, candidates(cfg, device)[0])
    return Runtime(device, choose_precision(cfg, model_cfg, device, model, purpose, batch, verbose))


def candidates(cfg, device: torch.device) -> list[Precision]:
    """The settings --amp and --memory-format leave open on this device, best guess first."""
    if device.type in ("cpu", "cuda"):
        bf16s = [False, True] if cfg.amp == "auto" else [cfg.amp == "bf16"]
        if device.type == "cpu" and cfg.amp == "auto" and native_bf16() is False:
            bf16s = [False]  # emulated bf16 runs several times slower than fp32: not worth timing
        lasts = [True, False] if cfg.memory_format == "auto" else [cfg.memory_format == "channels_last"]
    else:  # MPS and others: fp32 and the default layout, unless asked
        bf16s, lasts = [cfg.amp == "bf16"], [cfg.memory_format == "channels_last"]
    return [Precision(b, c) for b in bf16s for c in lasts]


def choose_precision(cfg, model_cfg, device: torch.device, model: torch.nn.Module, purpose: str, batch: int,
                     verbose: bool = True) -> Precision:
    """The fastest candidate for `purpose` ('train' or 'sample'), measured once per machine and cached."""
    options = candidates(cfg, device)
    if len(options) == 1:
        return options[0]
    key = cache_key(model_cfg, device, purpose, batch, options)
    cache = read_cache()
    if key in cache:
        return Precision(**cache[key]["choice"])
    seconds = time_candidates(model, model_cfg, device, options, purpose, batch)
    best = min(seconds, key=seconds.get)
    write_cache(key, {"choice": best.__dict__, "seconds": {p.describe(): round(s, 4) for p, s in seconds.items()}})
    if verbose:
        others = ", ".join(f"{p.describe()} {s:.3f}" for p, s in seconds.items() if p != best)
        # on stderr, beside the progress bars: stdout holds what a command reports (evaluate --json's JSON)
        print(f"{purpose} precision: {best.describe()}, the fastest here ({seconds[best]:.3f} s per step of "
              f"{batch}; {others}); measured once for {machine_name(device)}, cached in {cache_path()}",
              file=sys.stderr)
    return best


def time_candidates(model: torch.nn.Module, cfg, device: torch.device, options: list[Precision], purpose: str,
                    batch: int, warmup: int = 2, rounds: int = 3, slower: float = 2.0) -> dict[Precision, float]:
    """Seconds per step of each candidate, the best of `rounds`, taken in turns so that a passing load on
    the machine slows every candidate alike; the first calls only warm up oneDNN's kernel caches. A candidate
    `slower` times slower than the best so far after its first call is not timed further."""
    steps = {p: make_step(model, cfg, device, p, purpose, batch) for p in options}
    best = dict.fromkeys(options, float("inf"))
    for p, step in list(steps.items()):
        best[p] = timed(step, device)  # its first call: an upper bound on its speed
        if best[p] > slower * min(best.values()) and p is not options[0]:
            del steps[p]
            continue
        for _ in range(warmup - 1):
            step()
    for _ in range(rounds):
        for p, step in steps.items():
            best[p] = min(best[p], timed(step, device))
    return best


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def make_step(model: torch.nn.Module, cfg, device: torch.device, precision: Precision, purpose: str, batch: int):
    """One training step (forward + backward of the loss) or one sampling forward pass, on a copy of the model."""
    runtime = Runtime(device, precision)
    net = runtime.prepare(copy.deepcopy(model))
    x0 = runtime.batch(torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size))
    labels = torch.zeros(batch, dtype=torch.long, device=device) if cfg.num_classes else None
    schedule = schedule_from_config(cfg).to(device)  # the model's own T: a preconditioned network indexes by t
    t = torch.full((batch,), schedule.T // 2, device=device)

    def step():
        with runtime.autocast():
            if purpose == "train":
                net.zero_grad(set_to_none=True)
                diffusion_loss(lambda xt, tt: net(xt, tt, labels), x0, schedule).backward()
            else:
                with torch.inference_mode():
                    net(x0, t, labels)
    return step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags where the OS lists them (Linux), else None."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return None


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 then runs emulated whatever the CPU has
NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def bf16_flags() -> set[str]:
    """The CPU's bf16 instructions that oneDNN may use in this process."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in NO_BF16_ISAS:
        return set()
    return (cpu_flags() or set()) & {"avx512_bf16", "amx_bf16"}


def native_bf16() -> bool | None:
    """Whether this x86 CPU computes bf16 in hardware (AVX512-BF16 or AMX), or None where that is unknown."""
    if cpu_flags() is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return bool(bf16_flags())


def cpu_features() -> str:
    """What decides bf16's speed on a CPU besides its name: the vector instructions torch uses and native bf16."""
    native = sorted(bf16_flags())
    return f"{torch.backends.cpu.get_cpu_capability()}{' ' + ' '.join(native) if native else ''}"


def cache_key(cfg, device: torch.device, purpose: str, batch: int, options: list[Precision]) -> str:
    """What decides the fastest: the machine, torch, threads, the job, the model and the candidates the flags
    leave open (the winner among four is no answer for --amp none)."""
    model = ", ".join(f"{name}={getattr(cfg, name)}" for name in SPEED_FIELDS)
    machine = f"{cpu_name()} [{cpu_features()}]" if device.type == "cpu" else machine_name(device)
    return (f"{machine if device.type in ('cpu', 'cuda') else device.type} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | {purpose} batch {batch} | {model} | "
            f"among {', '.join(p.describe() for p in options)}")


def cache_path() -> Path:
    root = os.environ.get("DIFFUSION_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm-mnist"
    return Path(root) / "precision.json"


def read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache(key: str, value: dict) -> None:
    """Best effort and atomic: a read-only home or a second process never breaks training."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {**read_cache(), key: value}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
