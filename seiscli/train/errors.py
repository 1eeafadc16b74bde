"""Errors the entry point turns into one line on stderr and exit code 2 (no torch import here)."""


class LaunchError(RuntimeError):
    """The processes were started in a way this trainer cannot run in; the message says what to fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be resumed from here (another model shape, world size or strategy)."""
