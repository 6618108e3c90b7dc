"""Errors a user can cause. The CLI prints them as one `error:` line and exits with code 2.

Anything else that escapes is a bug in dealcl and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a flag, a config value, a data or model file."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stops and keeps its finished stages."""
