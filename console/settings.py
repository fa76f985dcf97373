"""The console's own settings (``JOBQ_UI_*``), read by pydantic-settings beside jobq's ``JOBQ_*`` ones."""

from __future__ import annotations

import ipaddress

from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class ConsoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOBQ_UI_", extra="ignore")

    # The secret every request must carry (``Authorization: Bearer <token>``, or HTTP basic with the
    # token as password) when set; required to bind anything but a loopback address.
    token: str | None = None
    # Rows per page of the task and document lists.
    page_size: int = 50
    # How often a live stream re-reads its rows when no NOTIFY came (NOTIFY is a hint, not the only path).
    poll_seconds: float = 2.0


class BindingRefused(ValueError):
    """Serving a non-loopback address without a token: the one line `jobq ui` prints."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_binding(host: str, settings: ConsoleSettings) -> None:
    """Refuse to serve the queue's controls on a network address without authentication."""
    if not is_loopback(host) and not settings.token:
        raise BindingRefused(f"refusing to serve on {host} without authentication: set JOBQ_UI_TOKEN "
                             "(or bind 127.0.0.1)")
