"""Errors a user can cause. The CLI prints them as one `error:` line and exits with code 2.

Anything else that escapes is a bug in dealcl and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: a flag, a config value, a data or model file."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stops and keeps its finished stages."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) inside a run: its finished stages are kept and `dealcl resume` continues it.
    A KeyboardInterrupt still, so that everything that cleans up on one (temporary files) does."""

    def __init__(self, run_dir: object, phase: str) -> None:
        super().__init__(f"interrupted during {phase} of {run_dir}")
        self.run_dir = run_dir
        self.phase = phase
