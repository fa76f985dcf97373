"""The exceptions jobq raises. Each carries a message fit to print as the CLI's one error line."""

from __future__ import annotations


class JobqError(Exception):
    """Base of every error jobq raises on purpose."""


class ConfigurationError(JobqError):
    pass


class DatabaseUnavailable(JobqError):
    """The server cannot be reached, went away mid-call, or refuses connections for now: worth a retry."""


class DatabaseError(JobqError):
    """The database refused a statement for a reason no narrower error names (one line, no payload)."""


class PermissionDenied(DatabaseError):
    """The database role lacks a privilege the call needs (e.g. a read-only role enqueueing)."""


class EmbeddedServerError(JobqError):
    pass


class SchemaMissing(JobqError):
    pass


class UnknownTaskType(JobqError):
    pass


class InvalidPayload(JobqError):
    pass


class PayloadTooLarge(InvalidPayload):
    """A payload over JOBQ_MAX_PAYLOAD_BYTES (or a document over JOBQ_MAX_DOCUMENT_BYTES): an HTTP API
    answers 413 for it rather than 400, so a client knows to send less, not to fix what it sent."""


class TaskNotFound(JobqError):
    pass


class InvalidTransition(JobqError):
    """The task is not in a state that allows the requested change (e.g. retry a running task)."""


class DuplicateTask(InvalidTransition):
    """The change would make a second live task with a dedupe key that a live task already holds."""


class DocumentError(JobqError):
    """A file that cannot be enqueued: missing, empty, encrypted, corrupt, unsupported or too big."""


class TaskFailed(JobqError):
    """A waited-for task ended failed or cancelled: its final status and last error."""

    def __init__(self, task_id: int, status: str, error: str | None) -> None:
        super().__init__(f"task {task_id} {status}" + (f": {error}" if error else ""))
        self.task_id = task_id
        self.status = status
        self.error = error


class WaitTimeout(JobqError, TimeoutError):
    """The wait's timeout passed before the task (or document) finished; the task is untouched."""


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

    @classmethod
    def from_retry_after(cls, value: str | float | None, **limits: float) -> Snooze:
        """The snooze an HTTP ``Retry-After`` asks for (seconds or an HTTP date), capped; `default` and
        `cap` as :func:`jobqueue.backpressure.snooze_for`.
        ``raise Snooze.from_retry_after(response.headers.get("Retry-After"))``."""
        from jobqueue.backpressure import snooze_for

        return snooze_for(value, **limits)


class LeaseLost(Exception):
    """The worker no longer owns the task (its lease expired and it was rescued elsewhere)."""
