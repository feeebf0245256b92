"""The JSON API under /api/v1/: thin shells over catalog.read.query, catalog.read.trace and
catalog.read.browse, with the same names and parameters as the functions and the CLI.

Every route is a plain `def`: FastAPI runs it in its thread pool, and each request reads on its
own cursor of the service's connection (committed data only).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from catalog.read import query
from catalog.read import browse as query_extra
from catalog import formats
from catalog.errors import CatalogError
from catalog.service import sql as sql_endpoint
from catalog.service.sql import ResultTooLarge
from catalog.store import sql_guard
from catalog.service.jobs import ACTIVE, IngestSettings
from catalog.service.validation import check_job
from catalog.read.trace import DEFAULT_DEST_ROLE, DEFAULT_SRC_ROLE, prune_for_picture, trace as trace_circuit

router = APIRouter(prefix="/api/v1")
ANY_ROLE = "any"  # as the CLI's trace: a role of 'any' means any token
SQL_MAX_ROWS = 10_000
# The most rows one list answer holds (edges, a head's lists), and the most nodes or edges of one
# trace. Nothing is cut silently: a larger answer is refused (413) with a line saying how to ask
# for less (top=N, pruning); SQL says what it left out (X-Truncated, "truncated").
MAX_LIST_ROWS = 10_000
MAX_TRACE_ELEMENTS = 10_000


def plain(value):
    """A value as JSON can carry it: NaN and infinities as null, DECIMAL (DuckDB's sum of
    integers) as a number, timestamps as ISO text, bytes as hex."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def rows_of(table) -> list[dict]:
    """An Arrow table as JSON-ready row dicts."""
    return [plain(row) for row in table.to_pylist()]


def bounded_rows(table, what: str, how: str) -> list[dict]:
    """rows_of(table), or a 413 when it holds more than MAX_LIST_ROWS rows (fetch MAX_LIST_ROWS + 1
    to tell): `what` the answer is, `how` to ask for less."""
    if table.num_rows > MAX_LIST_ROWS:
        raise ResultTooLarge(f"{what} has more than {MAX_LIST_ROWS:,} rows, the most one answer holds: {how}")
    return rows_of(table)


def limited_rows(table, limit: int, response: Response) -> list[dict]:
    """The first `limit` rows of a list the client limited (fetched with one row more), saying in
    the headers, as POST /sql does, whether rows were left out: X-Truncated, X-Row-Count."""
    truncated = table.num_rows > limit
    rows = rows_of(table.slice(0, limit))
    response.headers["X-Truncated"] = "true" if truncated else "false"
    response.headers["X-Row-Count"] = str(len(rows))
    return rows


def _top(top: int | None) -> int:
    """The LIMIT of a list whose client gave `top` (at most MAX_LIST_ROWS) or none: one row more
    than an answer may hold, so that bounded_rows can tell that rows were left."""
    return top if top is not None else MAX_LIST_ROWS + 1


def _service(request: Request):
    return request.app.state.service


def _role(value: str | None) -> str | None:
    return None if value in (None, "", ANY_ROLE) else value


def _heads(values: list[str] | None) -> list[str] | None:
    """Root heads from ?roots=9.9&roots=10.0 or ?roots=9.9,10.0."""
    found = [part.strip() for text in values or [] for part in text.split(",") if part.strip()]
    return found or None


class EffectParams:
    """The measured-effect options of edges, head and trace (catalog.interventions' effects)."""

    def __init__(self, effect: bool = False, min_effect: float | None = None, effect_mode: str = "local"):
        if min_effect is not None and not math.isfinite(min_effect):
            raise CatalogError(f"min_effect must be a finite number, not {min_effect}")
        self.values = {"effect": effect, "min_effect": min_effect, "effect_mode": effect_mode}


# -- runs and ingest jobs ---------------------------------------------------------------------

@router.get("/runs", summary="Every run, with its progress")
def list_runs(request: Request):
    with _service(request).reader() as con:
        return rows_of(query_extra.list_runs(con))


@router.get("/runs/{run_id}", summary="One run: its row, committed progress and ingest job")
def get_run(request: Request, run_id: int):
    service = _service(request)
    with service.reader() as con:
        found = [r for r in rows_of(query_extra.list_runs(con)) if r["run_id"] == run_id]
        if not found:
            raise query_extra.NotFound(f"no run {run_id} in the catalog")
        job = service.jobs.for_run(run_id)
        return dict(found[0], progress=query_extra.run_progress(con, run_id),
                    job=service.jobs.describe(job, con) if job else None)


@router.post("/runs", status_code=202, summary="Submit an ingest job (the options of `circuit-catalog ingest`)")
def submit_run(request: Request, settings: IngestSettings = Body(default_factory=IngestSettings)):
    service = _service(request)
    _check_job(request, settings)
    job = service.jobs.submit(settings)
    with service.reader() as con:
        return service.jobs.describe(job, con)


@router.post("/runs/{run_id}/resume", status_code=202, summary="Resume an unfinished run")
def resume_run(request: Request, run_id: int):
    service = _service(request)
    with service.reader() as con:
        return service.jobs.describe(service.jobs.resume(con, run_id, check=lambda s: _check_job(request, s)), con)


@router.delete("/runs/{run_id}", status_code=202, summary="Cancel the queued or running ingest job of a run")
def cancel_run(request: Request, run_id: int):
    service = _service(request)
    with service.reader() as con:
        query.resolve_run(con, run_id)  # an unknown run: 404, as everywhere
    job = service.jobs.for_run(run_id)
    if job is None or job.status not in ACTIVE:
        raise CatalogError(f"no queued or running ingest job works on run {run_id}: nothing to cancel")
    return _cancel(request, job.job_id)


def _check_job(request: Request, settings: IngestSettings) -> None:
    state = request.app.state
    check_job(settings, state.allowed_dirs, state.max_prompts)


def _cancel(request: Request, job_id: int):
    service = _service(request)
    job = service.jobs.cancel(job_id)
    with service.reader() as con:
        return service.jobs.describe(job, con)


@router.get("/jobs", summary="Ingest jobs of this service")
def list_jobs(request: Request):
    service = _service(request)
    with service.reader() as con:
        return [service.jobs.describe(job, con) for job in service.jobs.all()]


@router.get("/jobs/{job_id}", summary="One ingest job and its run's progress")
def get_job(request: Request, job_id: int):
    service = _service(request)
    with service.reader() as con:
        return service.jobs.describe(service.jobs.get(job_id), con)


@router.delete("/jobs/{job_id}", status_code=202,
               summary="Cancel an ingest job: a queued one at once, a running one at its next stop check")
def cancel_job(request: Request, job_id: int):
    return _cancel(request, job_id)


# -- heads and edges ------------------------------------------------------------------------

@router.get("/heads", summary="The layer x head grid: how often each head fires")
def head_grid(request: Request, run_id: int | None = None, dest_role: str | None = None,
              src_role: str | None = None):
    with _service(request).reader() as con:
        run = query.resolve_run(con, run_id)
        table = query_extra.head_grid(con, run.run_id, _role(dest_role), _role(src_role))
        return {"run_id": run.run_id, "n_layers": run.n_layers, "n_heads": run.n_heads, "heads": rows_of(table)}


@router.get("/heads/{head}", summary="Everything about one head (query.head_summary): spectrum and profile")
def head_summary(request: Request, head: str, run_id: int | None = None, top: int = Query(10, ge=1, le=MAX_LIST_ROWS),
                 effects: EffectParams = Depends()):
    with _service(request).reader() as con:
        return query.head_document(con, head, run_id=run_id, top=top, rows_of=rows_of, **effects.values)


@router.get("/heads/{head}/firings", summary="Firings of one head, strongest first")
def head_firings(request: Request, response: Response, head: str, run_id: int | None = None,
                 prompt_id: int | None = None, limit: int = Query(50, ge=1, le=MAX_LIST_ROWS)):
    with _service(request).reader() as con:
        table = query_extra.head_firings(con, head, run_id=run_id, prompt_id=prompt_id, limit=limit + 1)
    return limited_rows(table, limit, response)


@router.get("/edges_into/{head}", summary="Upstream heads of a head (query.edges_into)")
def edges_into(request: Request, head: str, side: str | None = None, role: str | None = None,
               dest_role: str | None = None, src_role: str | None = None,
               run_id: int | None = None, top: int | None = Query(None, ge=1, le=MAX_LIST_ROWS),
               n_svs: int = Query(3, ge=1),
               kind: list[str] | None = Query(None, description="component kinds: head, mlp, attn_bias, embed, offset"),
               effects: EffectParams = Depends()):
    with _service(request).reader() as con:
        return bounded_rows(query.edges_into(con, head, side=side, role=role, dest_role=dest_role,
                                             src_role=src_role, run_id=run_id, top=_top(top), n_svs=n_svs,
                                             kind=kind, **effects.values),
                            f"the list of edges into {head}", "ask for the strongest with top=N, or narrow it "
                            "by side, role, dest_role, src_role or kind")


@router.get("/edges_from/{head}", summary="Downstream heads of a head (query.edges_from)")
def edges_from(request: Request, head: str, side: str | None = None, role: str | None = None,
               dest_role: str | None = None, src_role: str | None = None,
               run_id: int | None = None, top: int | None = Query(None, ge=1, le=MAX_LIST_ROWS),
               n_svs: int = Query(3, ge=1), effects: EffectParams = Depends()):
    with _service(request).reader() as con:
        return bounded_rows(query.edges_from(con, head, side=side, role=role, dest_role=dest_role,
                                             src_role=src_role, run_id=run_id, top=_top(top), n_svs=n_svs,
                                             **effects.values),
                            f"the list of edges from {head}", "ask for the strongest with top=N, or narrow it "
                            "by side, role, dest_role or src_role")


# -- trace, firings, prompts ---------------------------------------------------------------------

TRACE_DOWNLOADS = formats.content_types(("graphml", "dot"))  # name -> content type


class PruneParams:
    """The trace's pruning options, as the CLI's --min-count, --min-weight, --max-depth, --top-k."""

    def __init__(self, min_count: int | None = Query(None, ge=1), min_weight: float | None = Query(None, ge=0),
                 max_depth: int | None = Query(None, ge=0), top_k: int | None = Query(None, ge=1)):
        self.values = {"min_count": min_count, "min_weight": min_weight, "max_depth": max_depth, "top_k": top_k}


@router.get("/trace", summary="The recursive trace (trace.trace) as JSON, GraphML or DOT")
def trace(request: Request, roots: list[str] | None = Query(None), dest_role: str = DEFAULT_DEST_ROLE,
          src_role: str = DEFAULT_SRC_ROLE, prompt_id: int | None = None, run_id: int | None = None,
          n_svs: int = Query(3, ge=1), kind: list[str] | None = Query(None), effects: EffectParams = Depends(),
          prune: PruneParams = Depends(), format: str = "json",
          picture: bool = Query(False, description="for drawing (the explorer): over a few hundred edges, pruned "
                                                   "automatically, with a note saying what was left out")):
    if format not in ("json",) + tuple(TRACE_DOWNLOADS):
        raise CatalogError(f"format must be json, graphml or dot, not '{format}'")
    with _service(request).reader() as con:
        graph = trace_circuit(con, roots=_heads(roots), dest_role=_role(dest_role), src_role=_role(src_role),
                              prompt_id=prompt_id, run_id=run_id, n_svs=n_svs, kinds=kind, **effects.values,
                              **prune.values)
    if picture:
        graph = prune_for_picture(graph)
    too_many = [f"{table.num_rows:,} {name}" for name, table in (("nodes", graph.nodes), ("edges", graph.edges))
                if table.num_rows > MAX_TRACE_ELEMENTS]
    if too_many:
        raise ResultTooLarge(f"the trace has {' and '.join(too_many)}, more than the {MAX_TRACE_ELEMENTS:,} one "
                             "answer holds: prune it (min_count, min_weight, max_depth, top_k), or trace one prompt "
                             "(prompt_id) or fewer roots")
    if format != "json":
        download = formats.get(format)
        name = f"trace-run{graph.run_id}" + (f"-prompt{prompt_id}" if prompt_id is not None else "")
        return Response(download.render(graph), media_type=download.content_type,
                        headers={"Content-Disposition": f'attachment; filename="{name}.{download.extension}"'})
    return plain(graph.document(rows_of))


@router.get("/firings/{prompt_id}/{head}/{dest_pos}/{src_pos}", summary="One firing with its sparse signal")
def firing(request: Request, prompt_id: int, head: str, dest_pos: int, src_pos: int, run_id: int | None = None):
    with _service(request).reader() as con:
        found = query_extra.firing(con, prompt_id, head, dest_pos, src_pos, run_id=run_id)
    return {"run_id": found["run_id"], "firing": plain(found["firing"]),
            "signal": rows_of(found["signal"]), "edges": rows_of(found["edges"])}


@router.get("/prompts", summary="The prompts of a run")
def list_prompts(request: Request, response: Response, run_id: int | None = None,
                 limit: int = Query(1000, ge=1, le=100_000)):
    with _service(request).reader() as con:
        return limited_rows(query_extra.list_prompts(con, run_id=run_id, limit=limit + 1), limit, response)


@router.get("/prompts/{prompt_id}", summary="One prompt with its tokens and roles")
def get_prompt(request: Request, prompt_id: int, run_id: int | None = None):
    with _service(request).reader() as con:
        found = query_extra.prompt(con, prompt_id, run_id=run_id)
    return {"run_id": found["run_id"], "prompt": plain(found["prompt"]), "tokens": rows_of(found["tokens"])}


@router.get("/roles", summary="The token roles of a run")
def roles(request: Request, run_id: int | None = None):
    with _service(request).reader() as con:
        return query_extra.run_roles(con, run_id=run_id)


# -- SQL --------------------------------------------------------------------------------------

@router.post("/sql", summary="Read-only SQL: JSON, CSV, Arrow IPC or Parquet")
async def run_sql(request: Request, sql: str = Body(..., embed=True, max_length=sql_guard.MAX_SQL_CHARS),
                  format: str = Body("json", embed=True),
                  max_rows: int = Body(SQL_MAX_ROWS, embed=True, ge=1, le=SQL_MAX_ROWS)):
    if format not in sql_endpoint.SQL_FORMATS:
        raise CatalogError(f"format must be one of {', '.join(sql_endpoint.SQL_FORMATS)}, not '{format}'")
    service = _service(request)
    async with request.app.state.sql_slots:  # fair and bounded; see sql.SqlSlots
        return await run_in_threadpool(_answer_sql, service, sql, format, max_rows, request.app.state.sql_timeout_s)


def _answer_sql(service, sql: str, format: str, max_rows: int, timeout_s: float):
    with service.reader() as con, service.running_query(con):
        try:
            table, truncated = sql_endpoint.run_read_only(con, sql, max_rows, timeout_s, service.private_paths)
        except sql_endpoint.SqlTimeout:
            if service.stopping:  # interrupted by the stop, not by the time limit
                raise sql_endpoint.SqlBusy("the service is stopping: the query was stopped") from None
            raise
    headers = {"X-Truncated": "true" if truncated else "false", "X-Row-Count": str(table.num_rows)}
    if format == "json":
        body = json.dumps({"columns": table.column_names, "rows": rows_of(table), "n_rows": table.num_rows,
                           "truncated": truncated}).encode()
        return Response(sql_endpoint.bounded(body), media_type="application/json", headers=headers)
    return Response(sql_endpoint.bounded(sql_endpoint.encode(table, format)),
                    media_type=sql_endpoint.SQL_FORMATS[format], headers=headers)
