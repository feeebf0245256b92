"""Running the service: uvicorn on the app, the marker file, and a clean stop on Ctrl-C / SIGTERM.

uvicorn turns SIGINT and SIGTERM into a graceful shutdown (in-flight requests finish, then the
app's shutdown lets the ingest batch being written commit). Afterwards uvicorn raises the
signal again with the handlers that were there before; ours only note it, so the process
ends normally with everything closed.
"""

from __future__ import annotations

import signal
from pathlib import Path

from catalog.service.connection import ServiceCatalog
from catalog.store.marker import remove_marker, write_marker


def serve(db_path: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          resume: bool = True, sql_timeout_s: float = 10.0, on_ready=None,
          allowed_dirs: list | None = None, max_prompts: int | None = None) -> list[int]:
    """Serve until stopped; return the signals that stopped it."""
    import uvicorn

    from catalog.service.app import create_app

    service = ServiceCatalog(db_path)  # fails with one line when another process holds the file
    stopped_by: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, frame: stopped_by.append(s))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    try:
        limits = {"max_prompts": max_prompts} if max_prompts is not None else {}
        app = create_app(service, token=token, resume=resume, sql_timeout_s=sql_timeout_s, host=host,
                         allowed_dirs=allowed_dirs, **limits)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=30)
        server = uvicorn.Server(config)
        base_exit = server.handle_exit

        def handle_exit(sig, frame):
            # The graceful shutdown waits for requests in flight, and a client's SQL query may run
            # up to its time limit: stop the running queries too (their clients get a 503).
            base_exit(sig, frame)
            service.interrupt_queries()

        server.handle_exit = handle_exit
        write_marker(db_path, url)
        if on_ready:
            on_ready(url)
        server.run()
    finally:
        remove_marker(db_path)
        jobs = getattr(service, "jobs", None)
        # An abandoned worker may still be inside DuckDB on its cursor: closing the connection under
        # it could crash or hang; the process ends instead (committed transactions are on disk).
        if jobs is None or not jobs.worker_alive:
            service.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return stopped_by
