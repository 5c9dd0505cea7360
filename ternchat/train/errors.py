"""Errors that stop a run with a clear message (exit status 1 from the CLI)."""


class RunError(RuntimeError):
    """A run that cannot go on or be loaded: non-finite losses, bad checkpoint, existing run, ..."""
