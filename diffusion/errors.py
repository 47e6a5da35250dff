"""User-facing errors: one line on stderr and a non-zero exit, never a traceback wall."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, bad checkpoint)."""


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """TrainingRun a command's main(); turn UserError into 'error: ...' and exit code 2 unless --debug."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except UserError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
