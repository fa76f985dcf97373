"""The exceptions jobq raises. Each carries a message fit to print as the CLI's one error line."""

from __future__ import annotations


class JobqError(Exception):
    """Base of every error jobq raises on purpose."""


class ConfigurationError(JobqError):
    pass


class DatabaseUnavailable(JobqError):
    pass


class EmbeddedServerError(JobqError):
    pass


class SchemaMissing(JobqError):
    pass


class UnknownTaskType(JobqError):
    pass


class InvalidPayload(JobqError):
    pass


class TaskNotFound(JobqError):
    pass


class InvalidTransition(JobqError):
    """The task is not in a state that allows the requested change (e.g. retry a running task)."""


class DedupeConflict(InvalidTransition):
    """A retry would make a second live task with a dedupe key a live task already holds."""


class PermissionDenied(JobqError):
    """The database refused the change to this role (e.g. a producer cancelling another role's task)."""


class DocumentError(JobqError):
    """A file that cannot be enqueued: missing, empty, encrypted, corrupt, unsupported or too big."""


# --- raised by handlers to steer the runtime ---


class Cancelled(Exception):
    """Raised inside a handler once its task's cancellation was requested.

    Deliberately not a JobqError: handlers that catch JobqError should not swallow it.
    """


class Fail(Exception):
    """Fail the task now, without spending the remaining retries (a non-retryable error)."""


class Snooze(Exception):
    """Put the task back in the queue to run again after `seconds`, without counting a retry."""

    def __init__(self, seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"snoozed for {seconds:g}s")
        self.seconds = seconds


class LeaseLost(Exception):
    """The worker no longer owns the task (its lease expired and it was rescued elsewhere)."""
