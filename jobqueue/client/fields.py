"""Checks of scalar fields (text, 32- and 64-bit integers, lists of names) and the parameters of the
`list` statement: everything a filter needs, without pydantic or the settings, so the read-only CLI
(`jobq ls`) can validate its filters without importing either (start-up time, bench/startup.py).
The encoder (encode.py) checks a task's fields with the same functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jobqueue.errors import InvalidPayload

INT32 = 2**31 - 1


def text(field: str, value: str | None, *, limit: int = 1000) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"{field} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidPayload(f"{field} contains a NUL character, which PostgreSQL text cannot store")
    if len(value) > limit:
        raise InvalidPayload(f"{field} is longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPayload(f"{field} is not valid Unicode (lone surrogate)") from None
    return value


def int32(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{field} must be an integer, got {type(value).__name__}")
    if not -INT32 - 1 <= value <= INT32:
        raise InvalidPayload(f"{field} {value} does not fit in 32 bits")
    return value


def bigint(field: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{field} must be an integer, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise InvalidPayload(f"{field} {value} does not fit in 64 bits")
    return value


def list_params(status: str | Sequence[str] | None, type: str | Sequence[str] | None, owner: str | None,
                doc_id: int | None, label: str | None, before_id: int | None, limit: int,
                error: str | None = None) -> tuple[Any, ...]:
    """client.sql `list` ($1..$8); a None filter is off."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidPayload(f"limit must be a non-negative integer, got {limit!r}")
    return (many(status), many(type), text("owner", owner, limit=200), bigint("doc_id", doc_id),
            text("label", label, limit=200), bigint("before_id", before_id), limit,
            text("error", error, limit=200))


def many(value: str | Sequence[str] | None) -> list[str] | None:
    if not value:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]
