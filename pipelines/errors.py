"""The one error type that the CLI turns into a one-line message and exit status 2."""


class UsageError(Exception):
    """Arguments, weights or locations that make a command impossible to run."""
