"""The service's token: every request carries it, or gets 401.

API clients send `Authorization: Bearer TOKEN`. A browser opens the explorer once as
`/?token=TOKEN` (as Jupyter does): the service answers with a cookie holding the token and a
redirect to `/`, so the token leaves the address bar and later requests carry the cookie.
"""

from __future__ import annotations

import secrets

from starlette.responses import JSONResponse, RedirectResponse
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "circuit_catalog_token"


class TokenMiddleware:
    """Pure ASGI middleware (no per-request task overhead): checks header or cookie; ?token= on / only."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token

    def _ok(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        from_query = request.query_params.get("token")
        if self._ok(from_query) and request.url.path == "/":
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        # The query string carries the token on the entry page only (above): anywhere else it
        # would end up in logs, browser history and Referer headers.
        if self._ok(bearer) or self._ok(request.cookies.get(COOKIE)):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            {"error": "missing or wrong token: send `Authorization: Bearer TOKEN`, or open /?token=TOKEN in a browser"},
            status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
