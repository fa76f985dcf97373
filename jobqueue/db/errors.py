"""One mapping of driver errors (psycopg and asyncpg) to jobq's errors.

Both drivers expose the server's SQLSTATE on their errors, so the mapping is written once, on the
code: the clients' callers see the same :class:`JobqError` subclass whichever driver they use, and
never a driver class (issue 11, item 23). Errors raised by the driver itself without a SQLSTATE
(asyncpg's ``InternalClientError`` "cannot switch to state ..." or ``InterfaceError`` when the server
shut down mid-call, psycopg's ``OperationalError`` on a lost connection) mean the connection is gone.
"""

from __future__ import annotations

from jobqueue.db.connect import first_line, redact_text
from jobqueue.errors import (
    DatabaseError,
    DatabaseUnavailable,
    DuplicateTask,
    InvalidPayload,
    JobqError,
    PermissionDenied,
    SchemaMissing,
)

# SQLSTATE classes (the first two characters) that mean "the server or the connection, not the call".
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# Driver errors without a SQLSTATE that mean the connection broke under the call.
_DRIVER_BROKEN = ("InternalClientError", "InterfaceError", "ConnectionDoesNotExistError", "OperationalError",
                  "ConnectionFailureError")


def translate(exc: BaseException) -> JobqError:
    """The JobqError a user sees for a driver error: one line, no payload echoed back."""
    if isinstance(exc, JobqError):
        return exc
    code = getattr(exc, "sqlstate", None) or ""
    line = first_line(exc)
    if code == "23503":  # foreign key: name the missing row (e.g. a doc_id with no document)
        detail = _detail(exc)
        return InvalidPayload(f"rejected by the database: {line}" + (f" ({detail})" if detail else ""))
    if code.startswith(("22", "54")) or code == "23514":  # data exception, program limit, CHECK
        return InvalidPayload(f"rejected by the database: {line}")
    if code == "23505":
        return DuplicateTask(f"rejected by the database: {line}")
    if code in ("42P01", "3F000"):
        return SchemaMissing(f"jobq's tables are missing ({line}): run `jobq migrate` first")
    if code == "42501":
        return PermissionDenied(f"permission denied by the database: {line}")
    if code.startswith(_UNAVAILABLE_CLASSES) or isinstance(exc, OSError | TimeoutError) or (
        not code and any(c.__name__ in _DRIVER_BROKEN for c in type(exc).__mro__)
    ):
        return DatabaseUnavailable(f"database unavailable: {line}")
    return DatabaseError(f"database error: {line}")


def _detail(exc: BaseException) -> str | None:
    diag = getattr(exc, "diag", None)  # psycopg
    detail = getattr(diag, "message_detail", None) if diag is not None else getattr(exc, "detail", None)
    return redact_text(detail) if isinstance(detail, str) and detail else None

