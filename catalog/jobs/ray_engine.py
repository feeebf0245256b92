"""Ingest's batches analysed by workers of a Ray cluster, committed by this process alone.

`ingest --engine ray` prepares the run here as always (the model loaded, decomposed and stored,
the prompts tokenized, the run created), then hands the batches not yet committed to Ray actors:
each actor loads the model once and runs the method's batch analysis on the batches it is given,
returning the batch's Arrow tables. This process is the catalog's only writer: it commits each
batch with its run_batches row in one transaction as results come back, in whatever order they
finish, so an interrupted Ray ingest resumes (locally or on Ray) exactly like a local one.

An actor that dies (its process killed, its node lost) is restarted by Ray and its unfinished
batches are run again; nothing is written until a batch's tables reach the writer, so no batch is
committed twice. A batch whose analysis raises ends the ingest with one line naming the batch.

Ray is imported only here, and only when a Ray ingest runs (pip install circuit-catalog[ray]).
"""

from __future__ import annotations

import importlib
import os
import time
from collections import deque

from catalog.errors import CatalogError
from catalog.jobs.settings import EngineSettings

# Batches each worker holds at once: one running and one waiting, so that a worker never idles
# while the writer commits and sends it the next.
IN_FLIGHT_PER_WORKER = 2
# Restarts of a dead worker, and retries of the batch it was running, before the ingest gives up.
WORKER_RESTARTS = 3


def import_ray():
    """The ray module, or one CatalogError line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise CatalogError("--engine ray needs Ray: pip install 'circuit-catalog[ray]' (or pip install ray)") from None
    return ray


class BatchWorker:
    """One Ray actor: the model loaded once, the run's batch analysis ready for any batch.

    `run_data` (a RunData actor) holds what every worker needs of the run: the prompts, the method's settings and the
    stored form the method reads (the driver has stored it; workers never open the catalog)."""

    def __init__(self, job: dict, analysis: str, run_data):
        import ray

        from catalog.methods.context import AnalysisContext
        from catalog.models.loading import load_model

        shared = ray.get(run_data.get.remote())  # a restarted worker asks again
        self.model = load_model(job["model"], job["model_path"], device=job["device"], dtype=job["dtype"])
        if self.model.weights_digest() != shared["weights_digest"]:
            raise CatalogError(f"the worker on {os.uname().nodename} loaded other weights than the driver "
                               f"({job['model_path'] or job['model']}): give every node the same checkpoint")
        forms = shared["forms"]
        context = AnalysisContext(
            model=self.model, settings=shared["settings"], items=shared["items"], token_lists=shared["token_lists"],
            end_pos=shared["end_pos"], answers=shared["answers"], wrongs=shared["wrongs"],
            stored_form=lambda form: forms[form],
            store_form=lambda form, make_table: None,  # the driver stored it before the workers started
        )
        module, _, function = analysis.partition(":")
        self.analyse = getattr(importlib.import_module(module), function)(context)

    def analyse_batch(self, first: int, stop: int) -> tuple[dict, dict]:
        """The batch's tables, and when the worker began and ended it and their size (the timings
        scripts/bench_ingest.py reports: analysis, transfer, the writer)."""
        began = time.time()
        rows = self.analyse(range(first, stop))
        return rows, {"began": began, "ended": time.time(), "pid": os.getpid(),
                      "bytes": sum(t.nbytes for t in rows.values() if t is not None)}

    def pid(self) -> int:
        return os.getpid()


class RunData:
    """One Ray actor holding the run's shared data for the workers. Workers get it from here, not
    as a constructor argument: Ray does not promise a restarted actor the objects its constructor
    was given, and this actor lives as long as the driver's handle. (Ray 2.60 still logs, once per
    worker, a note that the constructor has arguments in the object store.)"""

    def __init__(self, data: dict):
        self.data = data

    def get(self) -> dict:
        return self.data


class RayEngine:
    """Ingest's batches on a Ray cluster (EngineSettings: the address, the workers, their GPUs).

    `analysis` ("module:function") replaces the method's batch analysis on the workers; tests use
    it to make a worker fail."""

    def __init__(self, settings: EngineSettings, analysis: str | None = None):
        self.settings = settings
        self.analysis = analysis
        # Per batch received: its worker's timings and size, and when the driver had it ("received").
        self.timings: list[dict] = []
        self.workers: list = []  # the run's actors (handles), once started

    def analysed(self, job, chosen, context):
        """Start the workers for this run (they load the model while the driver goes on) and
        return what catalog.jobs.ingest's batch loop iterates: pending batches -> results."""
        ray = import_ray()
        started_here = _connect(ray, self.settings)
        try:
            context.say(f"starting {self.settings.workers} Ray worker(s), each loading {job.model_path or job.model} ...")
            holder = ray.remote(num_cpus=0, max_restarts=0)(RunData)
            run_data = holder.remote({
                "items": context.items, "token_lists": context.token_lists, "end_pos": context.end_pos,
                "answers": context.answers, "wrongs": context.wrongs, "settings": context.settings,
                "forms": {chosen.form: context.stored_form(chosen.form)},
                "weights_digest": context.model.weights_digest(),
            })
            worker = ray.remote(num_cpus=1, num_gpus=self.settings.gpus_per_worker, max_restarts=WORKER_RESTARTS,
                                max_task_retries=WORKER_RESTARTS)(BatchWorker)
            spec = {"model": job.model, "model_path": str(job.model_path) if job.model_path else None,
                    "device": job.device, "dtype": job.dtype}
            workers = self.workers = [worker.remote(spec, self.analysis or chosen.analysis, run_data)
                                      for _ in range(self.settings.workers)]
        except BaseException:
            if started_here:
                ray.shutdown()
            raise
        return lambda pending: _Results(ray, workers, run_data, pending, started_here, self.timings)


def _connect(ray, settings: EngineSettings) -> bool:
    """Join the cluster at --ray-address, or start a local one sized for the workers; True when
    this call started Ray (and so shuts it down at the end). A Ray already initialised in this
    process (a test's cluster, a notebook's) is used as it is."""
    import logging

    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if settings.ray_address is not None:
        try:
            ray.init(address=settings.ray_address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise CatalogError(f"no Ray cluster at --ray-address {settings.ray_address}: {err}") from None
    else:
        ray.init(num_cpus=max(settings.workers, os.cpu_count() or 1), **quiet)
    return True


class _Results:
    """The workers' results in the order they finish, each worker kept IN_FLIGHT_PER_WORKER
    batches deep. close() (the loop ended, failed or was interrupted) ends the workers, and the
    batches they are running with them, and, if this ingest started Ray, the local cluster."""

    def __init__(self, ray, workers, run_data, pending, started_here: bool, timings: list):
        self.ray, self.started_here, self.timings = ray, started_here, timings
        self.actors = [*workers, run_data]
        self.waiting = deque(pending)
        self.running: dict = {}  # ObjectRef -> (batch, prompt ids, worker)
        self.closed = False
        for _ in range(IN_FLIGHT_PER_WORKER):
            for worker in workers:
                self._send(worker)

    def _send(self, worker) -> None:
        if self.waiting:
            b, ids = self.waiting.popleft()
            self.running[worker.analyse_batch.remote(ids.start, ids.stop)] = (b, ids, worker)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.running:
            raise StopIteration
        ray = self.ray
        ready: list = []
        while not ready:  # short waits, so that Ctrl-C is seen between them
            ready, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)
        b, ids, worker = self.running.pop(ready[0])
        try:
            rows, timing = ray.get(ready[0])
        except ray.exceptions.RayError as err:
            raise CatalogError(f"batch {b} (prompts {ids[0]}-{ids[-1]}) failed on a Ray worker: "
                               f"{_cause(err)}") from None
        self.timings.append(dict(timing, batch=b, prompts=len(ids), received=time.time()))
        self._send(worker)
        return b, ids, rows

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        ray = self.ray
        for actor in self.actors:  # a running batch ends with its worker (Ray cannot force-cancel an actor's task)
            ray.kill(actor, no_restart=True)
        if self.started_here:
            ray.shutdown()


def _cause(err) -> str:
    """The worker's own exception as one line (a RayTaskError carries it as `cause`), else Ray's."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
        while isinstance(getattr(err, "cause", None), BaseException):  # an actor's init failing wraps twice
            err = err.cause
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text if isinstance(err, CatalogError) else f"{type(err).__name__}: {text}"
