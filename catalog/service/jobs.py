"""Ingest jobs inside the service: a queue and one worker thread, so one job writes at a time.

A job calls `catalog.jobs.ingest.ingest` exactly as `circuit-catalog ingest` does; batches are
committed one by one, so a job survives what the CLI ingest survives. Stopping the service
lets the batch being written commit and then stops the job (the run stays 'running'); the next
start resumes every unfinished run with the settings recorded in its `runs.params`, except a run
whose last job was cancelled (it waits until the same settings are submitted again). A job learns
its run as soon as the run's row exists, so this holds for a job cancelled before its first batch.

Every job is also a row of the catalog's `service_jobs` table, written as it changes: a restart
starts the jobs that were still queued, keeps the history, and numbers new jobs after the old
ones, so a job id names one job for the catalog's whole life.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from catalog.errors import CatalogError
from catalog.methods import DEFAULT as DEFAULT_METHOD
from catalog.methods import NAMES as METHOD_NAMES
from catalog.methods import method
from catalog.read.browse import NotFound, run_progress

log = logging.getLogger("circuit_catalog.service")


class IngestSettings(BaseModel):
    """The options of `circuit-catalog ingest`, with the same names (underscores) and defaults:
    those of catalog.jobs.settings.IngestSettings and of every method's settings class (held to
    them field by field by tests/test_settings.py), typed for JSON."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "gpt2"
    model_path: str | None = None
    dataset: str = "ioi"
    n_prompts: int = Field(256, ge=1)
    seed: int = 0
    prompts_file: str | None = None
    method: Literal[METHOD_NAMES] = DEFAULT_METHOD
    # method 'sad' (the 2024 method)
    attn_threshold: float = 0.5
    sv_threshold: float = 1.0
    edge_threshold: float = 0.7
    append_constant: bool = True
    sink_attention: float = 0.3
    sink_head_share: float = 0.15
    sink_min_heads: int = 8
    keep_sinks: bool = False
    # method 'accpp' (ACC++)
    threshold: float | Literal["dynamic"] = "dynamic"
    ig_steps: int = Field(64, ge=1)
    seeding: Literal["linear", "prob", "probe", "none"] = "linear"
    prob_target: Literal["answer", "top1"] = "answer"
    tau: float = 0.8
    probe: str | None = None
    probe_layer: int | None = Field(None, ge=0)
    heads: str | list[str] | None = None
    dest_roles: str | list[str] | None = None
    batch_size: int = Field(16, ge=1)
    add_model: bool = False
    new_run: bool = False
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "bfloat16"] = "float32"


JobStatus = Literal["queued", "running", "finished", "failed", "interrupted", "cancelled"]
ACTIVE = ("queued", "running")
# How long a stopping service waits for its worker: a batch commits or a stop check comes in far
# less; a worker still busy after this is inside one long call (a model load) and is abandoned.
WORKER_JOIN_TIMEOUT_S = 10.0


@dataclass
class Job:
    job_id: int
    settings: IngestSettings
    reason: str = "submitted"          # or "resume": restarted by the service
    status: JobStatus = "queued"
    run_id: int | None = None
    message: str | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    prompts_by_job: int = 0            # prompts this job committed (a resumed run had some already)
    summary: dict | None = None
    cancel_requested: bool = False     # DELETE while it runs: it stops at its next stop check


class JobQueue:
    """Runs ingest jobs one after another in a worker thread."""

    def __init__(self, service_catalog):
        self.catalog = service_catalog
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: dict[int, Job] = {}
        self._restored: list[Job] = []  # queued before the last stop: start_queued() starts them
        with service_catalog.reader() as cursor:
            for job, problem in load_jobs(cursor):
                self._jobs[job.job_id] = job
                if job.status == "running":  # the service died under it (a clean stop interrupts it)
                    job.status, job.finished_at = "interrupted", job.finished_at or time.time()
                    job.message = "the service stopped while this job ran; its run is resumed as an unfinished run"
                    save_job(cursor, job)
                elif job.status == "queued" and problem:  # never to be started: say why
                    job.status, job.finished_at = "failed", time.time()
                    job.message = f"its settings are not valid for this version of circuit-catalog ({problem})"
                    save_job(cursor, job)
                elif job.status == "queued":
                    self._restored.append(job)
        self._lock = threading.RLock()  # reentrant: cancel() looks its job up with get()
        self._stop = threading.Event()
        # For the response cache: `writes` changes whenever a job may have written, `busy` while
        # one runs (cache.ResponseCache serves a stored answer only while neither has changed).
        self.writes, self.busy = 0, False
        self._thread = threading.Thread(target=self._work, name="ingest-worker", daemon=True)
        self._thread.start()

    # -- submitting and reading --------------------------------------------------------------

    def submit(self, settings: IngestSettings, reason: str = "submitted") -> Job:
        if self._stop.is_set():
            raise CatalogError("the service is stopping: no new ingest jobs")
        with self._lock:
            job = Job(job_id=max(self._jobs, default=0) + 1, settings=settings, reason=reason)
            self._jobs[job.job_id] = job
        with self.catalog.reader() as cursor:
            save_job(cursor, job)
        self._queue.put(job)
        return job

    def cancel(self, job_id: int) -> Job:
        """A queued job is cancelled at once; a running one stops at its next stop check (between
        batches, in prompt generation, before the model load) and is then 'cancelled'. What it
        committed stays: the same settings submitted again resume its run."""
        with self._lock:
            job = self.get(job_id)
            if job.status == "queued":
                job.status, job.finished_at = "cancelled", time.time()
                job.message = "cancelled before it started"
            elif job.status == "running":
                job.cancel_requested = True
            else:
                raise CatalogError(f"ingest job {job_id} has already ended ({job.status}): nothing to cancel")
        if job.status == "cancelled":
            with self.catalog.reader() as cursor:
                save_job(cursor, job)
        return job

    def start_queued(self) -> list[Job]:
        """Queue again the jobs a previous start of the service accepted but never started (once:
        jobs submitted since are in the queue already)."""
        waiting, self._restored = self._restored, []
        for job in waiting:
            self._queue.put(job)
        return waiting

    def get(self, job_id: int) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise NotFound(f"no ingest job {job_id} in this service")
            return self._jobs[job_id]

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def for_run(self, run_id: int) -> Job | None:
        """The latest job that works (or worked) on this run."""
        found = [job for job in self.all() if job.run_id == run_id]
        return found[-1] if found else None

    def describe(self, job: Job, cursor) -> dict:
        """What GET shows: the job, and the run's committed progress read from the catalog."""
        end = job.finished_at or time.time()
        elapsed = end - job.started_at if job.started_at else 0.0
        doc = {"job_id": job.job_id, "status": job.status, "reason": job.reason, "run_id": job.run_id,
               "message": job.message, "settings": job.settings.model_dump(warnings=False),
               "submitted_at": job.submitted_at,
               "started_at": job.started_at, "finished_at": job.finished_at, "elapsed_s": round(elapsed, 3),
               "prompts_by_job": job.prompts_by_job, "cancel_requested": job.cancel_requested,
               "prompts_per_s": round(job.prompts_by_job / elapsed, 3) if elapsed > 0 else None,
               "progress": None, "summary": job.summary}
        if job.run_id is not None:
            doc["progress"] = run_progress(cursor, job.run_id)
        return doc

    # -- resuming --------------------------------------------------------------------------

    def resume_unfinished(self, cursor) -> list[Job]:
        """Queue a job for every run whose status is still 'running' (an interrupted ingest)."""
        found = cursor.execute("SELECT run_id, params FROM runs WHERE status = 'running' ORDER BY run_id").fetchall()
        # A run whose last job was cancelled stays as it is until someone submits it again.
        return [self.submit(settings_from_params(params), reason="resume") for run_id, params in found
                if getattr(self.for_run(run_id), "status", None) != "cancelled"]

    def resume(self, cursor, run_id: int, check=None) -> Job:
        found = cursor.execute("SELECT status, params FROM runs WHERE run_id = ?", [run_id]).fetchall()
        if not found:
            raise NotFound(f"no run {run_id} in the catalog")
        status, params = found[0]
        if status == "finished":
            raise CatalogError(f"run {run_id} is already finished")
        busy = self.for_run(run_id)
        if busy is not None and busy.status in ACTIVE:
            return busy
        settings = settings_from_params(params)
        if check is not None:  # a client asked: the run's settings pass the submission's checks
            check(settings)
        return self.submit(settings, reason="resume")

    # -- the worker ------------------------------------------------------------------------

    def stop(self, timeout: float = WORKER_JOIN_TIMEOUT_S) -> bool:
        """Stop after the batch being written commits (or at the job's next stop check); queued
        jobs are not started. Returns whether the worker ended within `timeout`: if not, it is
        abandoned (a daemon thread, ended with the process) and the caller must not close the
        connection it may still be using."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            running = [job.job_id for job in self.all() if job.status == "running"]
            log.warning("abandoned the ingest worker (job %s) after waiting %.0f s for it to stop; "
                        "committed batches are kept and the run resumes on the next start",
                        ", ".join(map(str, running)) or "none", timeout)
            return False
        return True

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stop.is_set():
                return
            if job.status != "queued":  # cancelled while it waited
                continue
            self._run(job)

    def _run(self, job: Job) -> None:
        from catalog.jobs.ingest import Interrupted, ingest  # imports torch lazily, on the first job
        from catalog.stopping import StopRequested, check_stop, stop_when

        job.status, job.started_at = "running", time.time()
        self.busy, self.writes = True, self.writes + 1
        cursor = self.catalog.cursor()

        def on_run(run_id: int) -> None:
            # Recorded before the first batch: a job cancelled (or a service killed) before any
            # batch commits still names its run, so a restart leaves a cancelled job's run alone.
            job.run_id = run_id
            save_job(cursor, job)

        def on_batch(batch: int) -> None:
            n = cursor.execute("SELECT last_prompt - first_prompt + 1 FROM run_batches WHERE run_id = ? AND batch = ?",
                               [job.run_id, batch]).fetchall()[0][0]
            job.prompts_by_job += n
            save_job(cursor, job)
            self.writes += 1
            check_stop()  # a KeyboardInterrupt: ingest turns it into Interrupted, naming what is saved

        status, message = "failed", None
        try:
            save_job(cursor, job)
            with stop_when(lambda: self._stop.is_set() or job.cancel_requested):
                summary = ingest(self.catalog.path, **ingest_keywords(job.settings), on_batch=on_batch,
                                 on_run=on_run)
            job.summary = {k: v for k, v in summary.items() if k != "db"}
            job.run_id = summary["run_id"]
            status = "finished"
            if summary.get("already_finished"):
                message = f"run {summary['run_id']} with these prompts and settings is already finished"
        except (Interrupted, StopRequested) as err:
            if job.cancel_requested:
                # Not the Interrupted line: it names the catalog's path on the server.
                status, message = "cancelled", ("cancelled; its committed batches are kept, and submitting the "
                                                 "same settings again resumes its run")
            elif isinstance(err, Interrupted):
                status, message = "interrupted", str(err)
            else:
                status, message = "interrupted", "the service stopped before this job committed a batch"
        except CatalogError as err:
            message = str(err)
        except Exception as err:  # a bug, not the user's input: keep the service up, log the traceback
            log.exception("ingest job %s failed", job.job_id)
            message = f"internal error: {type(err).__name__}: {err}"
        finally:
            job.finished_at = time.time()
            message = message if message is not None else job.message
            try:
                save_job(cursor, job, status=status, message=message)
            except Exception:  # the job's own outcome stands; its row says 'running' until the next start
                log.exception("could not record the end of ingest job %s", job.job_id)
            cursor.close()
            self.busy, self.writes = False, self.writes + 1
            # Last: a client that sees the job ended must also find the service no longer writing
            # (its next read may be kept by the response cache), and the job's row written.
            job.message, job.status = message, status


def ingest_keywords(settings: IngestSettings) -> dict:
    """The job's settings as `ingest` takes them: the job's own and its method's (a job's settings
    hold every method's, and the others' are not its own)."""
    from catalog.jobs.settings import IngestSettings as JobSettings
    from catalog.settings import fields_of

    values = settings.model_dump()
    names = [f.name for f in fields_of(JobSettings)] + [f.name for f in fields_of(method(values["method"]).settings)]
    return {name: values[name] for name in names}


# -- the service_jobs table ------------------------------------------------------------------

_COLUMNS = ("job_id", "settings", "reason", "status", "run_id", "message", "submitted_at", "started_at",
            "finished_at", "prompts_by_job", "summary")


def save_job(cursor, job: Job, **changes) -> None:
    """Write the job's row (with `changes` to status or message not yet made to the object)."""
    import json
    from datetime import datetime

    row = {column: getattr(job, column) for column in _COLUMNS}
    # warnings=False: the settings of an older version that no longer validate are written back as they were
    row.update(changes, settings=job.settings.model_dump_json(warnings=False),
               summary=json.dumps(job.summary, default=str) if job.summary is not None else None)
    for column in ("submitted_at", "started_at", "finished_at"):  # local time, as runs.started_at
        row[column] = datetime.fromtimestamp(row[column]) if row[column] is not None else None
    cursor.execute(f"INSERT OR REPLACE INTO service_jobs ({', '.join(_COLUMNS)}) VALUES "
                   f"({', '.join('?' * len(_COLUMNS))})", [row[column] for column in _COLUMNS])


def load_jobs(cursor) -> list[tuple[Job, str | None]]:
    """Every job of the catalog's service_jobs table, by job id, with why this version does not
    accept its settings (None if it does)."""
    import json

    jobs = []
    for values in cursor.execute(f"SELECT {', '.join(_COLUMNS)} FROM service_jobs ORDER BY job_id").fetchall():
        row = dict(zip(_COLUMNS, values))
        for column in ("submitted_at", "started_at", "finished_at"):
            row[column] = row[column].timestamp() if row[column] is not None else None
        row["settings"], problem = _stored_settings(row["settings"])
        row["summary"] = json.loads(row["summary"]) if row["summary"] is not None else None
        jobs.append((Job(**row), problem))
    return jobs


def settings_from_params(params) -> IngestSettings:
    """The settings that resume a run, from its `runs.params` (the command's parameters as given)."""
    import json

    if isinstance(params, str):
        params = json.loads(params)
    params = dict(params or {})
    params.update(params.pop("settings", None) or {})  # ACC++ records its settings nested
    known = set(IngestSettings.model_fields)
    values = {k: v for k, v in params.items() if k in known and v is not None}
    if values.get("prompts_file"):
        values.pop("dataset", None)  # the dataset of a JSONL run is its path; ingest sets it again
        values["prompts_file"] = str(Path(values["prompts_file"]))
    return IngestSettings(**values)


def _stored_settings(text: str) -> tuple[IngestSettings, str | None]:
    """A stored job's settings, and why this version does not accept them (None if it does): such
    settings (of another version) are kept as stored, to be shown, never run."""
    import json

    from pydantic import ValidationError

    try:
        return IngestSettings.model_validate_json(text), None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return IngestSettings.model_construct(**json.loads(text)), f"{where}: {first.get('msg', 'invalid')}"
