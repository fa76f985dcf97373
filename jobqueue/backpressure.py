"""Back-pressure from APIs: wait for the server's ``Retry-After`` instead of spending a retry.

A model endpoint that answers 429 (or 503 with a ``Retry-After``) is saying *when* to come back,
not that the task is broken: retrying with jobq's own backoff would spend the task's retries
against a wall and come back at the wrong time. A handler raises :class:`~jobqueue.Snooze` instead,
which puts the task back with ``run_at = now + delay`` and leaves ``retry_count`` alone.

The header is either delta-seconds (``120``) or an HTTP date (``Wed, 21 Oct 2026 07:28:00 GMT``,
RFC 9110 §10.2.3). The delay is capped, so a server (or a typo) asking for a week does not park the
task for a week; a 429 without the header waits ``default`` seconds. A 503 without it is an outage,
not a rate limit: nothing is raised, and the caller's ordinary error (and retry budget) applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from jobqueue.errors import Snooze

# What a snooze for a server's Retry-After may be at most, and a 429's wait without one (seconds).
MAX_RETRY_AFTER = 3600.0
DEFAULT_RETRY_AFTER = 30.0
TOO_MANY_REQUESTS = 429
SERVICE_UNAVAILABLE = 503


def retry_after_seconds(value: str | float | None, *, now: datetime | None = None) -> float | None:
    """Seconds from now that a ``Retry-After`` value asks for (never negative), None when it is absent
    or unreadable."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(0.0, float(value)) if math.isfinite(value) else None
    text = str(value).strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def snooze_for(value: str | float | None, *, default: float = DEFAULT_RETRY_AFTER,
               cap: float = MAX_RETRY_AFTER) -> Snooze:
    """The Snooze for a ``Retry-After`` value: its delay (or `default` when absent), at most `cap`."""
    seconds = retry_after_seconds(value)
    wait = min(cap, default if seconds is None else seconds)
    said = "no Retry-After" if seconds is None else f"Retry-After {str(value).strip()!r}"
    return Snooze(wait, f"rate limited by the server ({said}): snoozed for {wait:g}s")


def header(headers: Any, name: str) -> str | None:
    """A header from a plain dict (any case) or a case-insensitive headers object (http.client, httpx,
    requests, aiohttp all offer ``get``)."""
    if headers is None:
        return None
    if isinstance(headers, Mapping) and not hasattr(headers, "get_all"):
        for key, value in headers.items():
            if str(key).lower() == name.lower():
                return str(value)
        return None
    found = headers.get(name)
    return None if found is None else str(found)


def raise_for_backpressure(status: int, headers: Any = None, *, default: float = DEFAULT_RETRY_AFTER,
                           cap: float = MAX_RETRY_AFTER) -> None:
    """Raise a :class:`Snooze` when an HTTP response says "come back later": 429, or 503 with a
    ``Retry-After``. Any other response returns, for the caller's usual handling."""
    retry_after = header(headers, "Retry-After")
    if status == TOO_MANY_REQUESTS or (status == SERVICE_UNAVAILABLE and retry_after is not None):
        raise snooze_for(retry_after, default=default, cap=cap)


__all__ = ["MAX_RETRY_AFTER", "raise_for_backpressure", "retry_after_seconds", "snooze_for"]
