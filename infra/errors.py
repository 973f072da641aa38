"""Errors that mean the user must fix their input; the CLI prints them as one line."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class ConfigError(UserError):
    """A config key, value or type is wrong."""


class DataError(UserError):
    """Data files are missing, empty or unreadable."""
