"""What an asyncpg call can raise, in one tuple for the code that turns it into a JobqError.

Server errors carry a SQLSTATE; asyncpg's own, raised when the connection breaks under a call, do not:
``InternalClientError`` ("cannot switch to state ..."), ``InterfaceError``, a socket's ``OSError``, a
timeout (a ``TimeoutError``, an ``OSError`` too). db/errors.py maps each to the error the user sees.
"""

from __future__ import annotations

import asyncpg

DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
