"""Answers of the read routes, kept while nothing writes to the catalog.

The service is the only writer of its file, and only its ingest jobs write. So an answer
computed while no job runs stays right until the next job starts: each answer is stored with
the job queue's write count and served only while that count is unchanged and no job runs
(during a job, every request is computed afresh from the committed data). A client that wants
a fresh computation anyway sends `Cache-Control: no-cache`. The header `X-Cache` says hit or miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Read routes whose answers depend on the catalog only (runs and jobs show live progress).
CACHED_PREFIXES = ("/api/v1/heads", "/api/v1/edges_", "/api/v1/trace", "/api/v1/firings", "/api/v1/prompts",
                   "/api/v1/roles")
MAX_ENTRIES = 1024
MAX_BODY_BYTES = 4 * 1024 * 1024


class ResponseCache:
    """Pure ASGI middleware; `jobs` is the service's JobQueue (its `writes` count and `busy`)."""

    def __init__(self, app: ASGIApp, jobs):
        self.app, self.jobs = app, jobs
        self.entries: OrderedDict[tuple, tuple] = OrderedDict()
        self.lock = threading.Lock()

    def _cacheable(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith(CACHED_PREFIXES):
            return False
        headers = dict(scope["headers"])
        return b"no-cache" not in headers.get(b"cache-control", b"") and not self.jobs.busy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._cacheable(scope):
            await self.app(scope, receive, send)
            return
        key = (scope["path"], scope["query_string"])
        writes = self.jobs.writes
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None and hit[0] == writes:
                self.entries.move_to_end(key)
        if hit is not None and hit[0] == writes:
            _, status, headers, body = hit
            await send({"type": "http.response.start", "status": status, "headers": headers + [(b"x-cache", b"hit")]})
            await send({"type": "http.response.body", "body": body})
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-cache", b"miss")])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    # Kept before the last byte goes out: a client that asks again as soon as it
                    # has this answer must find it (the app may still run after sending).
                    self._keep(key, writes, start, b"".join(chunks))
            await send(message)

        await self.app(scope, receive, capture)

    def _keep(self, key: tuple, writes: int, start: dict, body: bytes) -> None:
        if start.get("status") != 200 or len(body) > MAX_BODY_BYTES or writes != self.jobs.writes \
                or self.jobs.busy:
            return
        with self.lock:
            self.entries[key] = (writes, 200, list(start.get("headers", [])), body)
            self.entries.move_to_end(key)
            while len(self.entries) > MAX_ENTRIES:
                self.entries.popitem(last=False)
