"""User-facing errors: one line on stderr and a non-zero exit, never a traceback wall (diffusion/cli.py:run_cli)."""
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, bad checkpoint, a full disk)."""


@contextmanager
def writing(what, after: str = ""):
    """Turn an OSError while writing `what` (a full disk, a read-only folder, a removed drive) into one line."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {what}: {err.strerror or err}{after}") from None
