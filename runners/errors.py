"""The error types that the CLI turns into a one-line message and a non-zero exit status.

They live in ``runners``, the bottom of the imports (pipelines -> transforms -> models ->
runners), because the runners raise them too (a bad preset, an unreachable Dask
scheduler) and may import nothing above them."""

__all__ = ["JobFailed", "UsageError"]


class UsageError(Exception):
    """Arguments, weights or locations that make a command impossible to run (exit 2)."""


class JobFailed(RuntimeError):
    """A submitted job failed on its engine; the message is one line (exit 1).

    Raised where the engine's own error is a remote traceback that says little to
    whoever runs the command (the Dask runner); the cause stays chained for logs."""
