"""Shared fixtures: real MNIST from $DIFFUSION_DATA_ROOT or a shared/data folder beside the repository when present, else a small generated stand-in."""
from __future__ import annotations

import base64
import io
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# the precision autotuner's cache: one per test session, shared with the commands the tests start
os.environ.setdefault("DIFFUSION_CACHE_DIR", tempfile.mkdtemp(prefix="ddpm-test-cache-"))
# where real MNIST may already be: $DIFFUSION_DATA_ROOT, or a shared/data folder beside the repository
REAL_DATA = [Path(p) for p in (os.environ.get("DIFFUSION_DATA_ROOT"), ROOT.parent / "shared" / "data") if p]


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor in MNIST's IDX format (magic 0x08 = uint8, then the dimensions)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape))
        f.write(array.to(torch.uint8).numpy().tobytes())


def fake_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n 28x28 images: class k has k % 5 + 1 bright bars, horizontal for k < 5, vertical otherwise,
    plus noise; counts and orientation survive the classifier's small random shifts."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.rand(n, 28, 28, generator=g) * 40
    for i, k in enumerate(labels.tolist()):
        for j in range(k % 5 + 1):
            rows = slice(5 + 4 * j, 7 + 4 * j)
            if k < 5:
                images[i, rows, 6:22] = 255
            else:
                images[i, 6:22, rows] = 255
    return images.to(torch.uint8), labels.to(torch.uint8)


def make_fake_mnist(root: Path, folder: str = "MNIST", n_train: int = 2048, n_test: int = 512) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_digits(n, seed)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """Real MNIST when one of REAL_DATA has it, otherwise generated IDX files in the same layout."""
    for root in REAL_DATA:
        if (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return root
    return make_fake_mnist(tmp_path_factory.mktemp("data"))


SAME_PRECISION = ["--amp", "none", "--memory-format", "contiguous"]  # two runs on the same kernels draw the same pixels
TINY = ["--base-channels", "8", "--channel-mults", "1", "2", "--timesteps", "50", "--limit-train", "256",
        "--batch-size", "64", "--sample-steps", "4", "--warmup-steps", "2", "--log-every", "2"]


@pytest.fixture(scope="session")
def tiny_checkpoint(data_root, tmp_path_factory) -> Path:
    """A tiny one-epoch model for the tests that only need some trained checkpoint."""
    work = tmp_path_factory.mktemp("tiny")
    res = run_cli("diffusion.main", *TINY, "--epochs", "1", "--sample-every", "0", "--data-root", str(data_root),
                  "--ckpt-dir", str(work / "ck"), "--out-dir", str(work / "out"))
    assert res.returncode == 0, res.stderr
    return work / "ck" / "epoch_001.pth"


def each_in_its_part(t: torch.Tensor, T: int) -> torch.Tensor:
    """Per i: whether t_i lies in the i-th of len(t) equal parts of 0..T-1, from floor(i T / n) to ceil((i + 1) T / n) - 1."""
    i, n = torch.arange(len(t)), len(t)
    return (i * T // n <= t) & (t < -(-(i + 1) * T // n))


def assert_clean_error(res, needle: str, after_progress: bool = False) -> None:
    """One error line on stderr (after_progress: the last line, after progress bars of the work done)."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()[-1:] if after_progress else res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.stderr


def run_cli(module: str, *args: str, timeout: float = 300, process: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """`python -m module args` as a user would type it; returns what a completed process would. It runs in this
    interpreter (the same entry point, without ~4 s of imports per call) unless process=True or it needs its
    own environment or folder (env=, cwd=)."""
    if process or kwargs:
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=kwargs.pop("cwd", ROOT), **kwargs)
    import contextlib
    import importlib

    from diffusion.cli import run_cli as entry

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng():
        try:
            entry(importlib.import_module(module).main, list(args))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def run_inprocess(capsys, module: str, *args: str) -> subprocess.CompletedProcess:
    """The same CLI entry point without a new interpreter (saves ~3 s of imports per call)."""
    import importlib

    from diffusion.cli import run_cli as entry

    capsys.readouterr()
    try:
        entry(importlib.import_module(module).main, list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def png_pixels(data_url_or_path) -> torch.Tensor:
    """A PNG file or data URL as uint8 gray pixels (H, W)."""
    if isinstance(data_url_or_path, Path):
        image = Image.open(data_url_or_path)
    else:
        image = Image.open(io.BytesIO(base64.b64decode(data_url_or_path.split(",", 1)[1])))
    return torch.from_numpy(np.array(image.convert("L")))


def digit_png(tmp_path: Path, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """A 28 x 28 stroke-like test digit, light on dark."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[4:24, 12:16] = 255
    image[4:8, 8:20] = torch.randint(100, 256, (4, 12), generator=g, dtype=torch.uint8)
    path = tmp_path / f"digit{seed}.png"
    Image.fromarray(image.numpy()).save(path)
    return path, image


def grid_cells(grid: torch.Tensor, n: int, nrow: int, side: int = 28) -> list[torch.Tensor]:
    """The n images of a save_grid PNG (padding 2; a single image is saved without any)."""
    if n == 1:
        return [grid]
    return [grid[2 + (side + 2) * (i // nrow): 2 + (side + 2) * (i // nrow) + side,
                 2 + (side + 2) * (i % nrow): 2 + (side + 2) * (i % nrow) + side] for i in range(n)]


def inpainting_cells(grid: torch.Tensor, n: int, nrow: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the input shown at the start of each row, the n completions) of an inpainting grid PNG."""
    cells = grid_cells(grid, n + -(-n // nrow), nrow + 1)
    return cells[0], [c for i, c in enumerate(cells) if i % (nrow + 1)]


def parse_args(argv: list[str]):
    """The RunConfig that `python -m diffusion.main ARGV` trains with."""
    from diffusion.main import parse_run
    return parse_run(argv)[1]
