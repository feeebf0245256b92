"""Ingest jobs inside the service: submitted over HTTP (and by `ingest --server`), read while they
write, queued one behind another, stopped by SIGTERM, killed and resumed on the next start. Each
test starts real `circuit-catalog serve` processes on loopback ports, with the tiny checkpoint."""

from __future__ import annotations

import threading
import time

import duckdb
import httpx
import pytest

from _catalog_fixture import invoke
from catalog.testing.service import ServerProcess

TOKEN = "jobs-token"
CONSISTENCY_SQL = """
SELECT (SELECT count(*) FROM firings) AS firings, (SELECT coalesce(sum(n_firings), 0) FROM run_batches) AS batch_firings,
       (SELECT count(*) FROM edges) AS edges, (SELECT coalesce(sum(n_edges), 0) FROM run_batches) AS batch_edges,
       (SELECT count(*) FROM run_batches) AS batches
"""
# Every stored row of a run but its timestamps: two catalogs with equal rows here are the same catalog.
RUN_TABLES = {"prompts": "run_id", "tokens": "run_id", "firings": "run_id", "firing_svs": "run_id",
              "edges": "run_id", "edge_svs": "run_id", "run_batches": "run_id, committed_at"}


def submit(client: httpx.Client, **settings) -> dict:
    response = client.post("/api/v1/runs", json=settings)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: int, done, timeout: float = 600) -> dict:
    """Until done(job) holds; the deadline is generous (a busy machine runs the tiny model's
    batches at a fraction of a prompt per second), and costs nothing when things go well."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {job}")


def finished(job: dict) -> bool:
    assert job["status"] not in ("failed", "interrupted"), job
    return job["status"] == "finished"


def assert_same_run(a, b, run_a: int, run_b: int) -> None:
    """Every row of run_a in catalog file a equals run_b's in b (run_id aside)."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{a}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{b}' AS b (READ_ONLY)")
    for table, excluded in RUN_TABLES.items():
        select = f"SELECT * EXCLUDE ({excluded})"
        only_a = con.execute(f"{select} FROM a.{table} WHERE run_id = {run_a} EXCEPT ALL "
                             f"{select} FROM b.{table} WHERE run_id = {run_b}").fetchall()
        only_b = con.execute(f"{select} FROM b.{table} WHERE run_id = {run_b} EXCEPT ALL "
                             f"{select} FROM a.{table} WHERE run_id = {run_a}").fetchall()
        count = con.execute(f"SELECT count(*) FROM a.{table} WHERE run_id = {run_a}").fetchall()[0][0]
        assert not only_a and not only_b and count > 0, (table, only_a[:3], only_b[:3])
    con.close()


def allow(directory) -> tuple[str, ...]:
    """serve's option letting jobs name files in `directory` (the tiny checkpoint's)."""
    return ("--allow-dir", str(directory))


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_checkpoint):
    """A service with a token, on a catalog that starts empty."""
    db = tmp_path_factory.mktemp("jobs") / "jobs.duckdb"
    with ServerProcess(db, token=TOKEN, args=allow(tiny_checkpoint)) as server, httpx.Client(
            base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield server, client
        assert server.stop() == 0, server.log()


def test_reads_during_a_job_see_whole_batches_and_jobs_queue(service, tiny_checkpoint):
    server, client = service
    settings = dict(model_path=str(tiny_checkpoint), n_prompts=24, batch_size=2, seed=5)
    first = submit(client, **settings)
    second = submit(client, **dict(settings, seed=6, n_prompts=4))
    assert first["status"] in ("queued", "running") and second["status"] == "queued"
    seen, errors, stop = [], [], threading.Event()

    def read():
        with httpx.Client(base_url=server.url, timeout=60, headers=client.headers) as reader:
            while not stop.is_set():
                # One read-only transaction: the counts and the batch records are one snapshot.
                try:
                    r = reader.post("/api/v1/sql", json={"sql": CONSISTENCY_SQL})
                    runs = reader.get("/api/v1/runs")
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    continue
                if r.status_code != 200 or runs.status_code != 200:
                    errors.append((r.text, runs.text))
                else:
                    seen.append(r.json()["rows"][0])
                time.sleep(0.02)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        done = wait_for(client, first["job_id"], finished)
        queued = wait_for(client, second["job_id"], finished)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not errors, errors[:2]
    # Reads went on during the job, and each saw only committed batches, whole.
    assert len({row["batches"] for row in seen}) >= 4, seen
    for row in seen:
        assert (row["firings"], row["edges"]) == (row["batch_firings"], row["batch_edges"]), row
    # One job writes at a time: the second started after the first had finished.
    assert queued["started_at"] >= done["finished_at"]
    progress = done["progress"]
    assert (progress["prompts_done"], progress["n_prompts"], progress["status"]) == (24, 24, "finished")
    assert (progress["firings"], progress["edges"]) == (done["summary"]["firings"], done["summary"]["edges"])
    assert done["prompts_per_s"] > 0 and done["prompts_by_job"] == 24
    run = client.get(f"/api/v1/runs/{done['run_id']}").json()
    assert run["job"]["job_id"] == first["job_id"] and run["progress"]["batches_done"] == 12
    # Answers are kept while nothing writes, and recomputed after a job.
    grid = client.get("/api/v1/heads")
    assert grid.headers["x-cache"] == "miss" and grid.json()["run_id"] == queued["run_id"]
    # Kept from then on (within a few requests: the answer computed first may race the worker's
    # last bookkeeping; a second computation is allowed, a stale answer is not).
    again = [client.get("/api/v1/heads") for _ in range(3)]
    assert again[-1].headers["x-cache"] == "hit" and all(r.json() == grid.json() for r in again)
    # The same settings again: nothing repeated.
    again = wait_for(client, submit(client, **settings)["job_id"], finished)
    assert again["run_id"] == done["run_id"] and "already finished" in again["message"]
    assert client.get("/api/v1/heads").headers["x-cache"] == "miss"
    refused = client.post("/api/v1/runs", json=dict(settings, attn_threshold=3))  # checked when submitted
    assert refused.status_code == 400 and "--attn-threshold" in refused.json()["error"]
    assert client.post("/api/v1/runs", json={"n_prompts": "lots"}).status_code == 422
    assert client.post("/api/v1/runs", json={"batchsize": 3}).status_code == 422


def test_ingest_server_option_submits_and_follows(service, tiny_checkpoint, monkeypatch):
    server, client = service
    monkeypatch.setenv("CIRCUIT_CATALOG_TOKEN", TOKEN)
    result = invoke("ingest", "--server", server.url, "--model-path", tiny_checkpoint,
                    "--n-prompts", "6", "--batch-size", "3", "--seed", "9")
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("run ") and ": 6 prompts" in line and server.url in line, result.output
    run_id = int(line.split(":")[0].split()[1])
    assert client.get(f"/api/v1/runs/{run_id}").json()["status"] == "finished"
    monkeypatch.setenv("CIRCUIT_CATALOG_TOKEN", "wrong")
    refused = invoke("ingest", "--server", server.url, "--model-path", tiny_checkpoint)
    assert refused.exit_code == 1 and "401" in refused.output
    assert invoke("ingest", "--model-path", tiny_checkpoint).exit_code == 1  # neither --db nor --server


def test_killed_then_stopped_server_resumes_its_run_to_the_same_catalog(tiny_checkpoint, tmp_path):
    """kill -9 mid-job; the next start resumes by itself; SIGTERM mid-resume lets the batch being
    written commit; a start with --no-resume leaves the run alone until asked. The finished run
    equals an uninterrupted ingest, row for row."""
    from catalog.jobs.ingest import ingest

    settings = dict(model_path=str(tiny_checkpoint), n_prompts=32, batch_size=2, seed=7)
    db = tmp_path / "killed.duckdb"

    def committed() -> tuple:
        with duckdb.connect(str(db), read_only=True) as con:
            status = con.execute("SELECT status FROM runs").fetchall()[0][0]
            return (status,) + con.execute(CONSISTENCY_SQL).fetchall()[0]

    killed = ServerProcess(db, args=allow(tiny_checkpoint))
    with httpx.Client(base_url=killed.url, timeout=60) as client:
        job = submit(client, **settings)
        wait_for(client, job["job_id"], lambda j: (j["progress"] or {}).get("prompts_done", 0) >= 4)
    killed.kill()  # SIGKILL, mid-job
    status, firings, batch_firings, edges, batch_edges, batches_killed = committed()
    assert status == "running" and 2 <= batches_killed < 16 and (firings, edges) == (batch_firings, batch_edges)

    stopped = ServerProcess(db, args=allow(tiny_checkpoint))  # resumes on its own
    with httpx.Client(base_url=stopped.url, timeout=60) as client:
        jobs = client.get("/api/v1/jobs").json()  # the killed job is kept, and said to be interrupted
        assert [(j["job_id"], j["reason"], j["status"]) for j in jobs][:1] == [(1, "submitted", "interrupted")]
        assert "stopped while this job ran" in jobs[0]["message"] and jobs[0]["prompts_by_job"] >= 4
        assert [(j["job_id"], j["reason"]) for j in jobs[1:]] == [(2, "resume")]
        wait_for(client, 2, lambda j: j["prompts_by_job"] >= 2)
    assert stopped.stop() == 0 and "stopped by SIGTERM" in stopped.log()
    assert not (tmp_path / "killed.duckdb.service.json").exists()
    status, firings, batch_firings, edges, batch_edges, batches_stopped = committed()
    assert status == "running" and batches_killed < batches_stopped < 16, (batches_killed, batches_stopped)
    assert (firings, edges) == (batch_firings, batch_edges)

    with ServerProcess(db, args=("--no-resume", *allow(tiny_checkpoint))) as again, httpx.Client(base_url=again.url, timeout=60) as client:
        history = client.get("/api/v1/jobs").json()  # nothing started by itself; both earlier jobs kept
        assert [(j["job_id"], j["status"]) for j in history] == [(1, "interrupted"), (2, "interrupted")]
        assert client.get("/api/v1/runs/1").json()["status"] == "running"
        resumed = client.post("/api/v1/runs/1/resume")
        assert resumed.status_code == 202
        done = wait_for(client, resumed.json()["job_id"], finished)
        assert done["summary"]["resumed"] is True and done["prompts_by_job"] == 32 - 2 * batches_stopped
        assert client.post("/api/v1/runs/1/resume").status_code == 400  # finished now
        assert again.stop() == 0
    reference = tmp_path / "whole.duckdb"
    ingest(reference, **settings)
    assert_same_run(db, reference, 1, 1)


def test_queued_jobs_survive_a_restart_under_their_own_ids(tiny_checkpoint, tmp_path):
    """SIGTERM while one job runs and another waits: the waiting one is kept in service_jobs and
    runs after the next start (even with --no-resume: it was accepted, not begun), under the id
    its client holds; new jobs are numbered after it; the catalog keeps the whole history."""
    from catalog.jobs.ingest import ingest

    db = tmp_path / "queued.duckdb"
    long = dict(model_path=str(tiny_checkpoint), n_prompts=96, batch_size=2, seed=7)  # stopped long before its end
    short = dict(model_path=str(tiny_checkpoint), n_prompts=4, batch_size=2, seed=8)
    first = ServerProcess(db, args=allow(tiny_checkpoint))
    with httpx.Client(base_url=first.url, timeout=60) as client:
        running, waiting = submit(client, **long), submit(client, **short)
        wait_for(client, running["job_id"], lambda j: j["prompts_by_job"] >= 2)
    assert first.stop() == 0
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.execute("SELECT job_id, reason, status, json_extract(settings, '$.seed')::INT FROM service_jobs "
                             "ORDER BY job_id").fetchall()
    assert stored == [(1, "submitted", "interrupted", 7), (2, "submitted", "queued", 8)]

    with ServerProcess(db, args=("--no-resume", *allow(tiny_checkpoint))) as again, httpx.Client(base_url=again.url, timeout=60) as client:
        done = wait_for(client, waiting["job_id"], finished)
        assert done["job_id"] == 2 and done["settings"]["seed"] == 8 and done["prompts_by_job"] == 4
        assert client.get("/api/v1/jobs/1").json()["status"] == "interrupted"  # --no-resume: left alone
        later = submit(client, **dict(short, seed=9))
        assert later["job_id"] == 3
        wait_for(client, 3, finished)
        assert again.stop() == 0
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("SELECT job_id, status, run_id, prompts_by_job, finished_at >= started_at, "
                           "json_extract(summary, '$.prompts')::INT FROM service_jobs ORDER BY job_id").fetchall()
    assert rows[1:] == [(2, "finished", 2, 4, True, 4), (3, "finished", 3, 4, True, 4)]
    reference = tmp_path / "whole.duckdb"
    ingest(reference, **short)
    assert_same_run(db, reference, 2, 1)


def test_stored_jobs_are_settled_when_the_service_opens_the_catalog(tmp_path):
    """What the table holds from an earlier service: a 'running' job (the service died) becomes
    'interrupted'; a queued job whose settings this version refuses becomes 'failed' saying
    why; a valid queued job waits to be started; ids go on after the largest. In-process, with
    the worker stopped before anything starts."""
    import json
    from datetime import datetime

    from catalog.service.connection import ServiceCatalog
    from catalog.service.jobs import IngestSettings, JobQueue

    db = tmp_path / "stored.duckdb"
    service = ServiceCatalog(db)
    valid = IngestSettings(n_prompts=4).model_dump_json()
    for job_id, settings, status in ((1, valid, "finished"), (2, valid, "running"),
                                     (3, json.dumps({"n_prompts": "lots"}), "queued"), (7, valid, "queued")):
        service.con.execute("INSERT INTO service_jobs (job_id, settings, reason, status, submitted_at) "
                            "VALUES (?, ?, 'submitted', ?, ?)", [job_id, settings, status, datetime.now()])
    jobs = JobQueue(service)
    jobs.stop()  # nothing runs: only what opening did is checked
    got = {job.job_id: job for job in jobs.all()}
    assert {i: job.status for i, job in got.items()} == {1: "finished", 2: "interrupted", 3: "failed", 7: "queued"}
    assert "stopped while this job ran" in got[2].message
    assert got[3].message.startswith("its settings are not valid for this version") and "n_prompts" in got[3].message
    stored = dict(service.con.execute("SELECT job_id, status FROM service_jobs").fetchall())
    assert stored == {1: "finished", 2: "interrupted", 3: "failed", 7: "queued"}
    # A job submitted on start (a resumption) before the stored ones are started is queued once, by
    # its submission: start_queued() starts the stored ones only, and only once.
    jobs._stop.clear()  # accept one more submission (the stopped worker never runs it)
    assert jobs.submit(IngestSettings(n_prompts=2), reason="resume").job_id == 8
    assert [job.job_id for job in jobs.start_queued()] == [7] and jobs.start_queued() == []
    assert [job.job_id for job in list(jobs._queue.queue) if job is not None] == [8, 7]
    service.close()


def test_a_restart_resumes_the_interrupted_run_and_starts_the_queued_job_once_each(tiny_checkpoint, tmp_path):
    """The same SIGTERM, restarted as usual: the interrupted run is resumed by a new job, the queued
    job runs under its id, and each runs once (no second pass finding its run finished)."""
    db = tmp_path / "restart.duckdb"
    long = dict(model_path=str(tiny_checkpoint), n_prompts=64, batch_size=2, seed=7)
    first = ServerProcess(db, args=allow(tiny_checkpoint))
    with httpx.Client(base_url=first.url, timeout=60) as client:
        running, waiting = submit(client, **long), submit(client, **dict(long, n_prompts=4, seed=8))
        wait_for(client, running["job_id"], lambda j: j["prompts_by_job"] >= 2)
    assert first.stop() == 0
    with duckdb.connect(str(db), read_only=True) as con:
        saved = con.execute("SELECT count(*) * 2 FROM run_batches").fetchall()[0][0]
    with ServerProcess(db, args=allow(tiny_checkpoint)) as again, httpx.Client(base_url=again.url, timeout=60) as client:
        wait_for(client, 3, finished)
        wait_for(client, waiting["job_id"], finished)
        # One more job goes behind anything still queued: once it is done, nothing ran in between.
        wait_for(client, submit(client, **dict(long, n_prompts=2, seed=9))["job_id"], finished)
        jobs = {j["job_id"]: j for j in client.get("/api/v1/jobs").json()}
        assert again.stop() == 0
    assert sorted(jobs) == [1, 2, 3, 4]
    assert (jobs[3]["reason"], jobs[3]["run_id"], jobs[3]["message"]) == ("resume", 1, None)
    assert jobs[3]["prompts_by_job"] == 64 - saved and jobs[3]["summary"]["prompts"] == 64
    assert (jobs[2]["reason"], jobs[2]["prompts_by_job"], jobs[2]["message"]) == ("submitted", 4, None)
