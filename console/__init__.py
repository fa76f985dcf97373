"""jobq's web console and HTTP API (``jobq ui``): the top layer beside the CLI.

It reads and changes the queue through jobqueue's public API and jobq_workers (documents), and
nothing below imports it. Needs the ``[ui]`` extra (FastAPI, Jinja2, uvicorn, python-multipart).
"""

from __future__ import annotations

from .app import create_app
from .settings import BindingRefused, ConsoleSettings, check_binding, is_loopback

__all__ = ["BindingRefused", "ConsoleSettings", "check_binding", "create_app", "is_loopback"]
