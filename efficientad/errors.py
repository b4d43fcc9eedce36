"""The one error type the CLI turns into a one-line message and a non-zero exit code (no traceback)."""


class UserError(Exception):
    """Something wrong with what the user gave (a path, a file, a flag), explained in the message."""
