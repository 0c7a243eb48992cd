"""Errors a user can fix, and the exit codes the command line maps them to."""

from __future__ import annotations

# Documented exit codes (README "Exit codes"). Schedulers and scripts rely on them.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_AUDIT_FAILED = 3
EXIT_CHECKPOINT_BAD = 4
EXIT_DIVERGED = 5  # non-finite loss persisted past fault.max_rollbacks: retrying cannot help
EXIT_CHAOS_DIFFERS = 6  # `chaos`: the faulty run's weights or audit differ from the reference
EXIT_DATA_UNAVAILABLE = 7  # a streamed corpus cannot be read: store unreachable, object missing
EXIT_REQUEUE = 75  # preempted, state saved: run the same command again (sysexits EX_TEMPFAIL)
EXIT_HANG = 76  # the watchdog found a rank without progress and ended the process


class UserError(Exception):
    """A problem with the user's input: printed as one line, no traceback.

    The message names what is wrong and what to do about it.
    """

    exit_code: int = EXIT_USAGE

    def __init__(self, message: str, *, reported_elsewhere: bool = False) -> None:
        super().__init__(message)
        # True on ranks that fail only because another rank did: that rank prints the error.
        self.reported_elsewhere = reported_elsewhere


class ConfigError(UserError):
    """The configuration is malformed, incomplete or inconsistent."""


class DataError(UserError):
    """The corpus or prepared data cannot be used as configured."""


class DataUnavailable(DataError):
    """A corpus in an object store cannot be read: unreachable, missing, or corrupt."""

    exit_code = EXIT_DATA_UNAVAILABLE


class FactoryError(UserError):
    """A user factory (``pkg.module:function``) cannot be imported or called."""
