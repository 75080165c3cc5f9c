"""Errors a user can act on.

Anything raised as a :class:`UserError` reaches the terminal as one line
(``error: <message>``) and a non-zero exit; tracebacks are for bugs only.
"""


class UserError(Exception):
    """A problem with the user's input: a file, a field, a config value or a credential."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration key or value."""


class StorageError(UserError):
    """A store location that cannot be reached, read or written."""

    exit_code = 3


class StoreError(UserError):
    """A store whose manifest or shards do not match the data contract."""

    exit_code = 4
