"""Errors meant for the person running a command: printed as one line, without a stack trace."""


class UserError(Exception):
    """Bad input (config value, missing file, missing weights) with an actionable message."""


class NonFiniteLossError(UserError):
    """The loss became NaN/Inf; the last good checkpoint was left intact."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the command needs is not there (the message says where to put it)."""
