"""User-facing errors.

Anything raised as a `MegasftError` is a problem with the user's input or configuration; the CLI
prints its message (which must say what was wrong, where, and what to do) and exits non-zero,
without a traceback. Any other exception is a bug in megasft and keeps its traceback.
"""


class MegasftError(Exception):
    """A problem the user can fix: bad input, bad configuration, a missing file."""


class ConfigError(MegasftError):
    """An invalid setting, found before any heavy work starts."""


class InputError(MegasftError):
    """An input file or directory that cannot be used at all (missing, unreadable, empty)."""


class LaunchError(MegasftError):
    """A launched training job failed; the message says where and ends with its last lines."""
