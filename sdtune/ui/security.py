"""Who may talk to the server: the loopback by default, anyone with the token otherwise.

- A loopback bind answers only requests whose Host is a loopback name (a page on another site
  cannot reach it through DNS rebinding).
- Any other bind needs a token: every API request carries it (the `X-Sdtune-Token` header, or
  the cookie that `POST /api/login` sets), else 401.
- A request that changes something must carry the `X-Sdtune` header, which a form or image on
  another site cannot add (no cross-site request forgery).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from fastapi import Request
from fastapi.responses import JSONResponse

from sdtune.errors import SdtuneError

TOKEN_HEADER = "x-sdtune-token"
TOKEN_COOKIE = "sdtune_token"
INTENT_HEADER = "x-sdtune"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the server asks for: none on the loopback unless given, else the given one or a
    new random one (printed at start)."""
    if token is not None and len(token) < 16:
        raise SdtuneError(
            "--token must be at least 16 characters (or leave it out for a random one)"
        )
    if is_loopback(host):
        return token
    return token or secrets.token_urlsafe(24)


def request_host(request: Request) -> str:
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def check_request(request: Request, bind_host: str, token: str | None) -> JSONResponse | None:
    """None when the request may go on, else the refusal to send."""
    if is_loopback(bind_host) and not is_loopback(request_host(request)):
        return JSONResponse({"error": "this server answers only on localhost"}, status_code=403)
    path = request.url.path
    if token is not None and path.startswith("/api/") and path != "/api/login":
        given = request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse(
                {"error": "a token is needed: it was printed when the server started"},
                status_code=401,
            )
    if request.method not in ("GET", "HEAD", "OPTIONS") and not request.headers.get(INTENT_HEADER):
        return JSONResponse(
            {"error": f"requests that change something need the '{INTENT_HEADER}' header"},
            status_code=403,
        )
    return None
