"""What the benchmarks share: running one of the project's commands as a user would, and reading its scorecard."""
from __future__ import annotations

import json
import subprocess
import sys


def run(args: list[str]) -> str:
    """The stdout of `python -m ARGS`; a failure stops the benchmark with the command and its last error line."""
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def scorecard(*flags: str) -> dict:
    """`python -m diffusion.evaluate --json FLAGS`: {'samples': ..., 'real_floor': ...}."""
    return json.loads(run(["diffusion.evaluate", "--json", *flags]))
