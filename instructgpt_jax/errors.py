"""Error types the CLI reports as one clean line (no traceback).

Raise these for problems in the user's input: configs, data files, checkpoints. The message
must name the offending key, file and line, or directory.
"""
import sys

USER_ERROR_EXIT = 2  # the exit status of every command line for a problem in the user's input


class UserError(Exception):
    """Base class: a problem with the user's input, printed as one line by the CLI."""


class ConfigError(UserError, ValueError):
    """An impossible or malformed config value; the message names the key."""


class DataError(UserError, ValueError):
    """A malformed data file; the message names the file (and line when there is one)."""


class CheckpointError(UserError, RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message names the directory."""


def report(error) -> int:
    """Prints `error: <message>` on one line to stderr; returns USER_ERROR_EXIT."""
    print("error: " + " ".join(str(error).split()), file=sys.stderr)
    return USER_ERROR_EXIT
