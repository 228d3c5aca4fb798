"""Error kinds the CLI maps to exit codes: user errors (2, one line, no traceback) vs. bugs (1)."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


class CheckFailed(Exception):
    """A verification check (e.g. parity) failed; the artifact is not published (exit code 1)."""
