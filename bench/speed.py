"""Side-by-side speed: training images/s, FLOPs, achieved GFLOP/s vs a measured matmul peak, peak memory,
and seconds to sample 16 digits. Not a test: run it on an idle machine.

    python bench/speed.py --data-root ../shared/data             # this project's configurations
    pip install -e ".[bench]" && python bench/speed.py --anchors  # plus diffusers and lucidrains' U-Nets
    python bench/speed.py --anchors --anchors-bf16                 # ... and the same under bf16 autocast
    python bench/speed.py --compile                                 # plus a torch.compile row (pays on CUDA)

On a machine with a CUDA GPU, ours run there (the anchors stay CPU-only) and the peak is a bf16 matmul's.
Each configuration runs in its own process so that peak memory (max RSS, or CUDA's max allocated) is its own.
On a CPU with AVX-512 every configuration runs twice: natively, and as on an AVX2-only laptop (ATen and oneDNN
limited to AVX2 for the whole process by ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA); each row names the
instructions ATen and oneDNN report they ran, so a simulation that did not take is seen.
"""
from __future__ import annotations

import argparse
import json
import os
try:
    import resource  # Unix only: peak memory
except ImportError:
    resource = None
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusion.config import PAPER, DataConfig

OURS = {  # name: Config overrides
    "ours: default (2x2 patches, 32/32 at 14/7; --amp/--memory-format auto)": {},
    "ours: default, fp32, channels_last": {"amp": "none", "memory_format": "channels_last"},
    "ours: default, fp32, NCHW": {"amp": "none", "memory_format": "contiguous"},
    "ours: default, bf16, channels_last": {"amp": "bf16", "memory_format": "channels_last"},
    "ours: default, bf16, NCHW": {"amp": "bf16", "memory_format": "contiguous"},
    "ours: 2x2 patches, 48/96 at 14/7": {"base_channels": 48, "channel_mults": (1, 2)},
    "ours: 2x2 patches, 48/48 at 14/7": {"base_channels": 48},
    "ours: 2x2 patches, 40/40 at 14/7": {"base_channels": 40},
    "ours: 2x2 patches, 32/64 at 14/7": {"channel_mults": (1, 2)},
    "ours: 2x2 patches, 32/32, attention at 14 and 7": {"attention_resolutions": (14, 7)},
    "ours: 2x2 patches, 32/32, attention only in the middle": {"attention_resolutions": ()},
    "ours: 2x2 patches, 32/32, four attention heads (the default before)": {"attention_heads": 4},
    "ours: 2x2 patches, 32/32, no stem skip": {"stem_skip": False},
    "ours: 2x2 patches, 32/32, no level skips": {"level_skips": False, "stem_skip": False},
    "ours: 2x2 patches, 64/64 at 14/7 (the default before)": {"base_channels": 64},
    "ours: --paper's network (every pixel, 32/64/64 at 28/14/7)": {
        k: PAPER[k] for k in ("patch_size", "base_channels", "channel_mults", "attention_heads", "level_skips",
                              "stem_skip")},
}
CPU_CLASSES = {"native": {}, "as AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ANCHORS = ("diffusers UNet2DModel (32,64,64), no attention, 32x32",
           "lucidrains Unet(dim=32, dim_mults=(1,2,4)), 28x28")
COMPILED = "ours: default, torch.compile"
BF16 = ", bf16 autocast"  # an anchor name with this suffix runs its step under bf16 autocast, as ours can


def sync() -> None:
    """CUDA runs asynchronously: wait for it before reading a clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(reps: int = 10) -> tuple[float, str]:
    """Achieved GFLOP/s of a square matmul: the practical ceiling for this machine (fp32 on a CPU; bf16 on
    CUDA, which trains in bf16 there)."""
    cuda = torch.cuda.is_available()
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    where = f"bf16 on {torch.cuda.get_device_name()}" if cuda else f"fp32, {torch.get_num_threads()} threads"
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9, f"{where}, {n}x{n}"


def forward_flops(fn, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def time_steps(step, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds per step, seconds of the warm-up steps: where torch.compile compiles)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps, warm


def ours(name: str, args) -> dict:
    from diffusion.dataloader import to_unit_range
    from diffusion.main import parse_run
    from diffusion.train import TrainingRun

    from diffusion.config import as_flags
    overrides = {"compile": True} if name == COMPILED else OURS[name]
    _, cfg = parse_run(["--data-root", args.data_root, "--limit-train", str(args.batch * 4),
                        "--batch-size", str(args.batch), *as_flags(overrides)])
    run = TrainingRun(cfg)
    x0 = to_unit_range(run.images[: args.batch])
    y = run.labels[: args.batch]
    t = torch.randint(0, 1000, (args.batch,), device=run.device)
    x_in = run.runtime.batch(x0)
    flops = forward_flops(lambda: run.model(x_in, t, y), args.batch)
    seconds, warm = time_steps(lambda: run.train_step(x0, y), args.steps)
    result = {"params": sum(p.numel() for p in run.model.parameters()), "fwd_flops": flops, "step_s": seconds,
              "warmup_s": warm,
              "precision": run.runtime.precision.describe()}
    if name == next(iter(OURS)):
        result["sampling"] = sampling_times(run.ema.module, run.cfg, run.device)
    return result


def sampling_times(net, cfg, device: torch.device) -> dict:
    """Seconds for 16 guided digits with each sampler (weights do not change the cost): the median of 5 runs
    after a warm-up, one run for DDPM-1000. The default sampler is timed with autoguidance (a second network of
    the same size, as an earlier epoch's checkpoint is) and with classifier-free guidance over three intervals."""
    import copy
    import statistics
    from pathlib import Path

    from diffusion.autotune import setup_runtime
    from diffusion.config import SampleConfig
    from diffusion.generation import generate
    from diffusion.recipe import choose_recipe

    out = {}
    for name, sampler, steps, interval in (("dpmpp-10, autoguided", "dpmpp", 10, None),
                                           ("dpmpp-10", "dpmpp", 10, None),
                                           ("dpmpp-10, guided at sigma <= 2", "dpmpp", 10, (0.0, 2.0)),
                                           ("dpmpp-10, guided at every sigma", "dpmpp", 10, (0.0, float("inf"))),
                                           ("dpmpp-20", "dpmpp", 20, None),
                                           ("ddim-50", "ddim", 50, None),
                                           ("ddpm-1000", "ddpm", None, None)):
        autoguided = "autoguided" in name  # the guide network is a copy: the cost is the same as an earlier epoch's
        asked = SampleConfig(sampler=sampler, sample_steps=steps, guidance_interval=interval,
                             guide_checkpoint=str(Path(__file__)) if autoguided else "none")
        recipe = choose_recipe(cfg.model, asked, task="sample", labelled=True)
        runtime = setup_runtime(cfg.runtime, cfg.model, net, "sample", 16, device=device, verbose=False)
        labels = torch.arange(16) % 10
        runs = 1 if sampler == "ddpm" else 5
        weak = copy.deepcopy(net) if autoguided else None
        if runs > 1:
            generate(net, cfg.model, recipe, 16, labels, runtime, progress=False, weak=weak)
        seconds = []
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            generate(net, cfg.model, recipe, 16, labels, runtime, progress=False, weak=weak)
            sync()
            seconds.append(time.perf_counter() - t0)
        out[name] = statistics.median(seconds)
    return out


def anchor(name: str, args) -> dict:
    if name.startswith("diffusers"):
        from diffusers import DDPMScheduler, UNet2DModel

        model = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                            down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
        sched = DDPMScheduler(num_train_timesteps=1000)
        x0 = torch.randn(args.batch, 1, 32, 32)

        def loss():
            noise, t = torch.randn_like(x0), torch.randint(0, 1000, (args.batch,))
            return F.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        fwd = lambda: model(x0, torch.randint(0, 1000, (args.batch,)))  # noqa: E731
    else:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet

        model = Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
        diffusion = GaussianDiffusion(model, image_size=28, timesteps=1000)
        x0 = torch.rand(args.batch, 1, 28, 28)
        loss = lambda: diffusion(x0)  # noqa: E731
        fwd = lambda: model(x0, torch.randint(0, 1000, (args.batch,)))  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith(BF16)):
            value = loss()
        value.backward()
        opt.step()
    flops = forward_flops(fwd, args.batch)
    return {"params": sum(p.numel() for p in model.parameters()), "fwd_flops": flops,
            "step_s": time_steps(step, args.steps)[0]}


def instructions() -> str:
    """The vector instructions this process runs: ATen's kernels' and oneDNN's (from its verbose header)."""
    if torch.cuda.is_available():
        return "CUDA"
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):  # prints "...,isa:Intel AVX2" on fd 1
        F.conv2d(torch.randn(32, 64, 14, 14), torch.randn(64, 64, 3, 3), padding=1)
    return f"ATen {torch.backends.cpu.get_cpu_capability()}"


def measure_one(name: str, args) -> dict:
    result = ours(name, args) if name in OURS or name == COMPILED else anchor(name, args)
    result["instructions"] = instructions()
    if name.endswith(BF16):
        result["precision"] = "bf16 autocast"
    result["name"] = name
    result["images_per_s"] = args.batch / result["step_s"]
    result["achieved_gflops"] = 3 * result["fwd_flops"] * result["images_per_s"] / 1e9  # backward ~ 2x forward
    if torch.cuda.is_available() and (name in OURS or name == COMPILED):
        result["peak_rss_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else float("nan")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=DataConfig().data_root, help="MNIST root (default: $DIFFUSION_DATA_ROOT or ./data)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed training steps per configuration")
    parser.add_argument("--anchors", action="store_true", help="also measure diffusers and lucidrains")
    parser.add_argument("--anchors-bf16", action="store_true",
                        help="also measure the anchors under bf16 autocast (their libraries' default is fp32)")
    parser.add_argument("--compile", action="store_true", help="also measure the default under torch.compile")
    parser.add_argument("--only", metavar="NAME", help="measure this one configuration and print it as JSON")
    parser.add_argument("--json", help="also write all results to this file")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure_one(args.only, args)))
        return
    peak, peak_how = matmul_peak()
    names = (list(OURS) + ([COMPILED] if args.compile else []) + (list(ANCHORS) if args.anchors else [])
             + ([a + BF16 for a in ANCHORS] if args.anchors_bf16 else []))
    classes = cpu_classes()
    results = []
    for cpu_class, env in classes.items():
        for name in names:
            cmd = [sys.executable, __file__, "--only", name, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--data-root", args.data_root]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
            if proc.returncode:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            onednn = [line.split("isa:")[1] for line in proc.stdout.splitlines() if ",isa:" in line]
            result["instructions"] += f", oneDNN {onednn[0]}" if onednn else ""
            results.append({**result, "cpu_class": cpu_class})
    memory = "peak CUDA MiB" if torch.cuda.is_available() else "peak RSS MiB"
    print(f"\nmatmul peak ({peak_how}): {peak:.0f} GFLOP/s; batch {args.batch}\n")
    print(f"| CPU path | configuration | precision | params | train img/s | fwd GFLOP/img | achieved GFLOP/s | "
          f"% of peak | {memory} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['cpu_class']}: {r['instructions']} | {r['name']} | {r.get('precision', '-')} | "
              f"{r['params'] / 1e6:.2f} M | {r['images_per_s']:.0f} | {r['fwd_flops'] / 1e9:.3f} | "
              f"{r['achieved_gflops']:.0f} | {100 * r['achieved_gflops'] / peak:.0f}% | {r['peak_rss_mib']:.0f} |")
    for r in results:
        if "sampling" in r:
            print(f"\nseconds for 16 guided digits ({r['cpu_class']}): " +
                  "; ".join(f"{k} {v:.2f} s" for k, v in r["sampling"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "results": results}, f, indent=2)


def cpu_classes() -> dict[str, dict]:
    """The CPU paths to time: this one, and AVX2 as most laptops have it where this CPU has AVX-512."""
    if torch.cuda.is_available() or "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return {"native": {}}
    return CPU_CLASSES


if __name__ == "__main__":
    main()
