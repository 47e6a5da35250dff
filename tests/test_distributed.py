"""Scaling paths: two processes with torchrun and the gloo backend on CPU (same weights on both ranks, one
writer), and the CUDA path's flags (--compile, --amp bf16), which also run on a CPU."""
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from diffusion.checkpoint import load_checkpoint
from diffusion.checkpoint import model_config
from diffusion.model import build_model
from tests.conftest import ROOT, TINY, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, argv: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from diffusion.train import train
    from tests.conftest import parse_args
    run = train(parse_args(argv))
    torch.save({"model": run.model.state_dict(), "ema": run.ema.module.state_dict(), "history": run.history},
               f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(data_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("ddp")
    argv = [*TINY, "--epochs", "2", "--data-root", str(data_root), "--ckpt-dir", str(work / "ck"),
            "--out-dir", str(work / "out"), "--device", "cpu"]
    mp.spawn(worker, args=(2, free_port(), argv, str(work)), nprocs=2, join=True)
    return work, argv


def test_both_ranks_end_with_identical_weights(two_ranks):
    work, _ = two_ranks
    r0, r1 = torch.load(work / "rank0.pt", weights_only=True), torch.load(work / "rank1.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), f"{key}.{name} differs across ranks"


def test_only_rank0_writes_one_checkpoint_per_epoch(two_ranks):
    work, _ = two_ranks
    assert sorted(p.name for p in (work / "ck").glob("*.pth")) == ["epoch_001.pth", "epoch_002.pth"]
    assert len((work / "out" / "metrics.jsonl").read_text().splitlines()) == 2


def test_loss_matches_single_process_with_same_global_batch(two_ranks, tmp_path):
    work, argv = two_ranks
    single = tmp_path / "single"
    argv = [a.replace(str(work), str(single)) for a in argv]
    res = run_cli("diffusion.main", *argv, process=True)
    assert res.returncode == 0, res.stderr
    ddp = torch.load(work / "rank0.pt", weights_only=True)["history"]
    ref = load_checkpoint(single / "ck" / "epoch_002.pth")["history"]
    for a, b in zip(ddp, ref):  # same batches; only the noise draws differ per rank
        assert a["loss"] == pytest.approx(b["loss"], rel=0.1)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_command_line(data_root, tmp_path):
    res = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port", str(free_port()), "-m", "diffusion.main",
                          *TINY, "--epochs", "1", "--data-root", str(data_root), "--ckpt-dir", str(tmp_path),
                          "--out-dir", str(tmp_path / "out"), "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("mean loss") == 1  # only rank 0 prints
    assert load_checkpoint(tmp_path / "epoch_001.pth")["epoch"] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_step(data_root, tmp_path):
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--device", "cuda", "--amp", "bf16",
                  "--data-root", str(data_root), "--ckpt-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr


def test_cuda_path_flags_on_cpu_compile_and_bf16(data_root, tmp_path):
    """--compile and --amp bf16 run on any device; the checkpoint holds the plain module's weights."""
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--device", "cpu", "--compile", "--amp", "bf16",
                  "--sample-every", "0", "--data-root", str(data_root), "--ckpt-dir", str(tmp_path), process=True)
    assert res.returncode == 0, res.stderr[-2000:]
    state = load_checkpoint(tmp_path / "epoch_001.pth")
    assert all(math.isfinite(r["loss"]) for r in state["history"])
    assert not any("_orig_mod" in k for k in state["model"]), "weights saved from the compiled wrapper"
    assert state["model"].keys() == build_model(model_config(state, "x")).state_dict().keys()
    out = run_cli("diffusion.sampling", "--checkpoint", str(tmp_path / "epoch_001.pth"), "--output",
                  str(tmp_path / "g.png"), "--amp", "bf16")
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sampling_takes_labels_from_the_cpu(data_root, tmp_path):
    from diffusion.config import ModelConfig, SampleConfig
    from diffusion.generation import generate
    from diffusion.recipe import choose_recipe
    from diffusion.runtime import Runtime
    cfg = ModelConfig()
    net = build_model(cfg).to("cuda")
    recipe = choose_recipe(cfg, SampleConfig(guide_checkpoint="none"), task="sample", labelled=True)
    images = generate(net, cfg, recipe, 4, torch.arange(4), Runtime(torch.device("cuda")), progress=False)
    assert images.shape == (4, 1, 28, 28) and images.is_cuda


def test_compiled_model_skips_the_shorter_last_batch(data_root, monkeypatch):
    """A compiled model meeting a new batch size recompiles (over a minute on an H100): the epoch's shorter
    last batch goes through the eager model, which shares its weights."""
    from diffusion.train import TrainingRun
    from tests.conftest import parse_args
    calls = []

    class Spy(torch.nn.Module):  # stands in for torch.compile's wrapper and counts its batches
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t, y):
            calls.append(len(x))
            return self.module(x, t, y)

    monkeypatch.setattr(torch, "compile", Spy)
    cfg = parse_args(["--data-root", str(data_root), "--limit-train", "40", "--batch-size", "16", "--compile",
                      "--device", "cpu", "--amp", "none", "--memory-format", "contiguous", "--base-channels", "8",
                      "--channel-mults", "1", "2", "--sample-every", "0"])
    run = TrainingRun(cfg)
    x0, y = run.images[:16].float() / 127.5 - 1, run.labels[:16]
    run.train_step(x0, y)
    run.train_step(x0[:8], y[:8])
    assert calls == [16]
