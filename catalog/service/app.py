"""The FastAPI application: the API routes, the explorer's static files, errors as one-line JSON.

Errors: a user mistake (CatalogError) is 400, a missing run, prompt, firing or job 404, a SQL
query past its time limit 408, a malformed parameter 422, each as {"error": "one line"}. A bug
is a 500 with the same body shape; its traceback goes to the server's log, not to the client.
"""

from __future__ import annotations

import logging

import duckdb
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

import catalog
from catalog.errors import CatalogError
from catalog.read.browse import NotFound
from catalog.service.api import router
from catalog.service.auth import TokenMiddleware
from catalog.service.cache import ResponseCache
from catalog.service.jobs import JobQueue
from catalog.service.guard import RequestGuard
from catalog.service.validation import DEFAULT_MAX_PROMPTS
from catalog.service.methods_api import router as methods_router
from catalog.service.sql import ResultTooLarge, SqlBusy, SqlSlots, SqlTimeout
from catalog.store.sql_guard import scrub

log = logging.getLogger("circuit_catalog.service")
STATIC = resources.files("catalog.service") / "static"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem.get("loc", ()) if p not in ("query", "path", "body"))
        parts.append(f"{where or 'request'}: {problem.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(service, token: str | None = None, resume: bool = True, sql_timeout_s: float = 10.0,
               host: str = "127.0.0.1", allowed_dirs: list | None = None,
               max_prompts: int = DEFAULT_MAX_PROMPTS) -> FastAPI:
    """The app over an open ServiceCatalog; `resume` queues unfinished runs at startup. Submitted
    jobs may name files only inside `allowed_dirs` and ask for at most `max_prompts` prompts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if resume:
            with service.reader() as con:
                for job in service.jobs.resume_unfinished(con):
                    log.warning("resuming an unfinished run (job %s)", job.job_id)
        # Accepted before the last stop and never started: not a resumption, so run even with --no-resume.
        for job in service.jobs.start_queued():
            log.warning("starting job %s, queued before the service last stopped", job.job_id)
        yield
        # Shutdown (Ctrl-C, SIGTERM): the batch being written commits, or the job's next stop check
        # stops it; a worker stuck in one long call is abandoned after a bounded wait (jobs.stop).
        service.jobs.stop()

    service.jobs = JobQueue(service)
    app = FastAPI(title="circuit-catalog", version=catalog.__version__, lifespan=lifespan,
                  description="Which attention heads talk to which: the catalog's query layer over HTTP.",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN; /openapi.json stays
    app.state.service = service
    app.state.sql_timeout_s = sql_timeout_s
    app.state.allowed_dirs = list(allowed_dirs or [])
    app.state.max_prompts = max_prompts
    app.state.sql_slots = SqlSlots(sql_timeout_s)
    app.include_router(router)
    app.include_router(methods_router)

    @app.exception_handler(CatalogError)
    async def catalog_error(request: Request, err: CatalogError):
        status = 404 if isinstance(err, NotFound) else 408 if isinstance(err, SqlTimeout) \
            else 503 if isinstance(err, SqlBusy) else 413 if isinstance(err, ResultTooLarge) else 400
        # The read layer names the catalog's file (for the CLI): not the server's business to show.
        return _error(status, scrub(str(err), service.private_paths))

    @app.exception_handler(duckdb.ConversionException)
    @app.exception_handler(duckdb.OutOfRangeException)
    @app.exception_handler(duckdb.InvalidInputException)
    async def bad_value(request: Request, err: duckdb.Error):  # a parameter DuckDB cannot take (a huge number)
        return _error(400, "invalid request: a parameter is out of range ("
                      + scrub(str(err).splitlines()[0], service.private_paths) + ")")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        return _error(422, _validation_message(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return _error(err.status_code, err.detail)

    # A middleware, not an exception handler for Exception: Starlette re-raises after such a
    # handler, and uvicorn then drops the connection (a keep-alive client sees a reset).
    @app.middleware("http")
    async def internal_error(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as err:
            log.exception("internal error on %s", request.url.path)
            return _error(500, f"internal error ({type(err).__name__}); the server's log has the details")

    @app.get("/", include_in_schema=False)
    def explorer():
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.add_middleware(ResponseCache, jobs=service.jobs)
    if token:  # added last but one, so outermost but one: no answer, cached or not, without the token
        app.add_middleware(TokenMiddleware, token=token)
    app.add_middleware(RequestGuard, host=host)  # outermost: Host, Origin, JSON bodies, body size
    return app
