"""User-facing errors: one line on stderr and a non-zero exit, never a traceback wall (diffusion/cli.py:run_cli)."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, bad checkpoint)."""
