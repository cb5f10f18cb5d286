"""Errors meant for the person running a command: printed as one line, without a stack trace."""


class UserError(Exception):
    """Bad input (config value, missing file, missing weights) with an actionable message."""


class NonFiniteLossError(UserError):
    """The loss became NaN/Inf; the last good checkpoint was left intact."""
