"""Authentication, CSRF and the response headers every page carries.

- **Authentication**: with ``JOBQ_UI_TOKEN`` set, every request carries it, as ``Authorization: Bearer
  <token>`` (API clients) or HTTP basic with the token as password (a browser asks once). Without a
  token the console serves loopback only (``settings.check_binding``).
- **CSRF** (double submit): pages set a random token in a cookie and put it in every form; a POST
  must send it back in the form (``csrf``) or the ``X-CSRF-Token`` header. A cross-site page can make
  the browser send the cookie but cannot read it. API clients that are not browsers send
  ``Authorization: Bearer`` or an ``X-Jobq-Client`` header instead: neither can be added to a
  cross-site request without a CORS preflight, which this server never grants.
- **Headers**: a Content-Security-Policy allowing only this origin's scripts and styles (no inline
  script can run even if escaping were ever missed), no framing, no sniffing.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "jobq_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
CLIENT_HEADER = "x-jobq-client"
HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; object-src 'none'; "
     b"base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


def token_matches(header: str, token: str) -> bool:
    """A bearer token, or HTTP basic whose password is the token (any user name)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(decoded.partition(":")[2].encode(), token.encode())
    return False


class Guard:
    """ASGI middleware: the token check (when one is set) and the security headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is not None:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not token_matches(header, self.token):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="jobq"'), *HEADERS]})
                await send({"type": "http.response.body", "body": b'{"error": "authentication required"}'})
                return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def csrf_token(request: Request) -> str:
    """This browser's token: the cookie's, or a new one (the page sets it)."""
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)


def csrf_ok(request: Request, sent: str | None, *, api: bool = False) -> bool:
    if api:
        if CLIENT_HEADER in request.headers or request.headers.get("authorization", "").lower().startswith("bearer "):
            return True
        sent = sent or request.headers.get(CSRF_HEADER)
    cookie = request.cookies.get(CSRF_COOKIE)
    return bool(cookie and sent) and secrets.compare_digest(str(cookie).encode(), str(sent).encode())
