"""What a request must look like before any route sees it (pure ASGI middleware).

- `Host` must name the address the service is bound to (or a loopback name): a web page that
  rebinds its own DNS name to 127.0.0.1 sends its own name as Host and is refused.
- A request that changes something (POST, PUT, PATCH, DELETE) with an `Origin` must come from the
  service's own origin, and a body must be JSON: a cross-site HTML form can send neither a
  same-origin Origin nor `application/json` (which a browser only sends cross-site after a CORS
  preflight this service never grants).
- Bodies are bounded (MAX_BODY_BYTES), by Content-Length and by counting what arrives.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
WRITES = {"POST", "PUT", "PATCH", "DELETE"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
ALL_INTERFACES = {"0.0.0.0", "::", ""}


class BodyTooLarge(BaseException):
    """Not an Exception: the app's own error middleware would answer it as a 500."""


def host_name(value: str) -> str:
    """The name of a Host header or an origin's authority, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, host: str):
        self.app = app
        bound = host_name(host)
        # Bound to every interface, the service cannot know its names: any Host passes (see docs).
        self.allowed_hosts = None if bound in ALL_INTERFACES else LOOPBACK_NAMES | {bound}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            await _answer(send, 421, f"refused: Host '{host[:100]}' is not this service's address")
            return
        if scope["method"] in WRITES:
            origin = headers.get("origin")
            if origin is not None and host_name(origin.split("://", 1)[-1]) != host_name(host):
                await _answer(send, 403, "refused: a request that changes something must come from this "
                                         "service's own origin")
                return
            length = headers.get("content-length", "0")
            has_body = headers.get("transfer-encoding") is not None or length not in ("", "0")
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if has_body and kind != "application/json":
                await _answer(send, 415, "refused: a request body must be JSON (Content-Type: application/json)")
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _answer(send, 413, f"refused: the request body is larger than {MAX_BODY_BYTES} bytes")
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await _answer(send, 413, f"refused: the request body is larger than {MAX_BODY_BYTES} bytes")
