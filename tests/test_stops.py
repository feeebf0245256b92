"""Every stop stops: SIGTERM and Ctrl-C (SIGINT) to the CLI and to `serve` in each phase of the
work (model loading, decomposition, a batch, a long SQL query; prompt generation is in
test_service_job_control.py), each ending within seconds with one line and what is committed
kept. The tiny checkpoint's phases take milliseconds, so a phase is made slow in the child
(catalog.testing.phases: one long call, as a large checkpoint's load is). Every wait is on a
condition with a deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import duckdb
import httpx
import pytest

from catalog.testing.phases import prelude
from catalog.testing.service import ServerProcess
from test_service_jobs import CONSISTENCY_SQL, allow, assert_same_run, submit, wait_for

SIGNALS = [signal.SIGTERM, signal.SIGINT]
# A query that runs for minutes: ten billion rows hashed and summed.
LONG_QUERY = "SELECT sum(hash(a.range + b.range)) FROM range(100000) a, range(100000) b"


def _exit_code(sig) -> int:
    return 130 if sig == signal.SIGINT else 0  # serve: Ctrl-C 130, a service manager's SIGTERM 0


def _cli(*args, code: str = "") -> subprocess.Popen:
    command = [sys.executable, "-c", (code + "; " if code else "") + "from catalog.cli import entry; entry()", *args]
    # A terminal's Ctrl-C: SIGINT handled by default in the child, even where the tests run as a
    # background job (started with SIGINT ignored).
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_stderr(process, fragment: str, timeout: float = 90) -> str:
    import select

    deadline, buffer, fd = time.monotonic() + timeout, "", process.stderr.fileno()
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([fd], [], [], 0.2)[0]:
            buffer += os.read(fd, 4096).decode(errors="replace")
            if fragment in buffer:
                return buffer
    process.kill()
    raise AssertionError(f"no {fragment!r} within {timeout} s: {buffer[-2000:]}")


def _wait_for_log(server: ServerProcess, fragment: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fragment in server.log():
            return
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {fragment!r} in the server's log within {timeout} s: {server.log()[-2000:]}")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_for_cpu(pid: int, seconds: float, timeout: float = 90) -> None:
    """Until the process has burnt `seconds` more CPU time: its query is running."""
    start, deadline = _cpu_seconds(pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _cpu_seconds(pid) - start >= seconds:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not work for {seconds} s of CPU within {timeout} s")


def _stopped(process, sig, timeout: float = 30) -> tuple[str, float]:
    asked = time.monotonic()
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=timeout)
    finally:
        process.kill()
    return err, time.monotonic() - asked


def _last_lines(err: str) -> list[str]:
    """What the command said itself: not the status lines of the slow steps, not the bar."""
    return [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not line.startswith(("loading model", "slow phase", "decomposing", "run "))]


# -- the CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("phase", ["load", "decompose"])
def test_cli_ingest_stops_in_a_slow_phase_and_resumes(tiny_checkpoint, tmp_path, phase, sig):
    db = tmp_path / "cli.duckdb"
    args = ("ingest", "--db", str(db), "--model-path", str(tiny_checkpoint), "--n-prompts", "4", "--seed", "5")
    process = _cli(*args, code=prelude(phase, 120))
    _wait_for_stderr(process, f"slow phase: {phase}")
    err, took = _stopped(process, sig)
    assert process.returncode == 130 and took < 30, err
    said = _last_lines(err)
    assert len(said) == 1 and said[0].startswith("interrupted before this session saved a batch"), err
    again = _cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and out.startswith("run 1: 4 prompts"), err


@pytest.mark.parametrize("sig", SIGNALS)
def test_cli_sql_stops_a_long_query(catalog_db, sig):
    process = _cli("sql", "--db", str(catalog_db), LONG_QUERY)
    _wait_for_cpu(process.pid, 2.0)  # past the imports: the query runs
    err, took = _stopped(process, sig)
    assert process.returncode == 130 and took < 30, err
    assert _last_lines(err) == ["interrupted: nothing was changed"], err


@pytest.mark.parametrize("sig", SIGNALS)
def test_cli_query_commands_stop_a_long_query(catalog_db, sig):
    # `heads` whose query takes minutes: its own read-only connection running the long query.
    slow_heads = ("import catalog.read.overview as o; "
                  f"o.heads = lambda con, run_id, sort=None: con.execute({LONG_QUERY!r}).arrow()")
    process = _cli("heads", "--db", str(catalog_db), code=slow_heads)
    _wait_for_cpu(process.pid, 2.0)
    err, took = _stopped(process, sig)
    assert process.returncode == 130 and took < 30, err
    assert _last_lines(err) == ["interrupted: nothing was changed"], err


# -- the service -----------------------------------------------------------------------------

def _job_status(db) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT status FROM service_jobs ORDER BY job_id").fetchall()


@pytest.mark.parametrize("sig", SIGNALS)
def test_serve_abandons_a_worker_stuck_in_a_model_load(tiny_checkpoint, tmp_path, sig):
    db = tmp_path / "load.duckdb"
    with ServerProcess(db, args=allow(tiny_checkpoint), prelude=prelude("load", 600)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        submit(client, model_path=str(tiny_checkpoint), n_prompts=4)
        _wait_for_log(server, "slow phase: load")
        asked = time.monotonic()
        assert server.stop(timeout=60, sig=sig) == _exit_code(sig), server.log()
        # 10 s of waiting for the worker, then the process ends without it.
        assert time.monotonic() - asked < 40, server.log()
    log = server.log()
    assert "abandoned the ingest worker" in log and log.strip().splitlines()[-1].startswith("stopped by"), log
    assert _job_status(db) == [("running",)]  # the next start marks it interrupted (test_service_jobs)


@pytest.mark.parametrize("sig", SIGNALS)
def test_serve_stops_a_job_between_layers_of_its_decomposition(tiny_checkpoint, tmp_path, sig):
    db = tmp_path / "decompose.duckdb"
    # 3 layers of 6 s each: longer than the 10 s the service waits for its worker, so only a stop
    # check between layers ends the job itself (rather than by abandoning it).
    with ServerProcess(db, args=allow(tiny_checkpoint), prelude=prelude("decompose", 6)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        submit(client, model_path=str(tiny_checkpoint), n_prompts=4)
        _wait_for_log(server, "slow phase: decompose")
        assert server.stop(timeout=60, sig=sig) == _exit_code(sig), server.log()
    log = server.log()
    assert "abandoned" not in log and log.strip().splitlines()[-1].startswith("stopped by"), log
    assert _job_status(db) == [("interrupted",)]  # recorded by the job itself as it stopped
    with duckdb.connect(str(db), read_only=True) as con:  # nothing half-written: no model, no run
        assert con.execute("SELECT (SELECT count(*) FROM models), (SELECT count(*) FROM runs)").fetchall() == [(0, 0)]


@pytest.mark.parametrize("sig", SIGNALS)
def test_serve_stops_in_a_batch_keeping_the_committed_ones(tiny_checkpoint, tmp_path, sig):
    db = tmp_path / "batch.duckdb"
    with ServerProcess(db, args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, model_path=str(tiny_checkpoint), n_prompts=64, batch_size=2, seed=4)
        wait_for(client, job["job_id"], lambda j: j["prompts_by_job"] >= 2)
        asked = time.monotonic()
        assert server.stop(timeout=60, sig=sig) == _exit_code(sig), server.log()
        assert time.monotonic() - asked < 30 and "abandoned" not in server.log(), server.log()
    assert server.log().strip().splitlines()[-1].startswith("stopped by"), server.log()
    assert _job_status(db) == [("interrupted",)]
    with duckdb.connect(str(db), read_only=True) as con:
        rows = dict(zip(("firings", "batch_firings", "edges", "batch_edges", "batches"),
                        con.execute(CONSISTENCY_SQL).fetchall()[0]))
        status = con.execute("SELECT status FROM runs").fetchall()
    assert rows["batches"] >= 1 and rows["firings"] == rows["batch_firings"] and rows["edges"] == rows["batch_edges"]
    assert status == [("running",)]  # unfinished: the next start resumes it


@pytest.mark.parametrize("sig", SIGNALS)
def test_serve_stops_a_long_sql_query_at_once(catalog_db, tmp_path, sig):
    import shutil

    db = tmp_path / "query.duckdb"
    shutil.copy(catalog_db, db)
    answers = []
    with ServerProcess(db, args=("--sql-timeout", "600")) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        asking = threading.Thread(target=lambda: answers.append(client.post("/api/v1/sql", json={"sql": LONG_QUERY})))
        asking.start()
        _wait_for_cpu(server.process.pid, 2.0)
        asked = time.monotonic()
        assert server.stop(timeout=60, sig=sig) == _exit_code(sig), server.log()
        assert time.monotonic() - asked < 30, server.log()
        asking.join(60)
    assert answers and answers[0].status_code == 503 and "stopping" in answers[0].json()["error"], answers
    assert server.log().strip().splitlines()[-1].startswith("stopped by"), server.log()


def test_a_job_cancelled_before_its_first_batch_resumes_after_a_restart(tiny_checkpoint, tmp_path):
    from catalog.jobs.ingest import ingest

    db = tmp_path / "cancelled.duckdb"
    settings = dict(model_path=str(tiny_checkpoint), n_prompts=6, batch_size=2, seed=9)
    with ServerProcess(db, args=allow(tiny_checkpoint), prelude=prelude("load", 3)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, **settings)
        _wait_for_log(server, "slow phase: load")
        assert client.delete(f"/api/v1/jobs/{job['job_id']}").status_code == 202
        cancelled = wait_for(client, job["job_id"], lambda j: j["status"] not in ("queued", "running"))
        assert cancelled["status"] == "cancelled" and cancelled["prompts_by_job"] == 0, cancelled
        assert server.stop() == 0, server.log()
    with ServerProcess(db, args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        assert [j["status"] for j in client.get("/api/v1/jobs").json()] == ["cancelled"]  # not resumed by itself
        again = wait_for(client, submit(client, **settings)["job_id"], lambda j: j["status"] in ("finished", "failed"))
        assert again["status"] == "finished" and again["prompts_by_job"] == 6, again
        assert server.stop() == 0, server.log()
    reference = tmp_path / "uncancelled.duckdb"
    ingest(reference, **settings)
    assert_same_run(db, reference, again["run_id"], 1)


def test_a_job_cancelled_after_its_run_row_stays_cancelled_across_a_restart(tiny_checkpoint, tmp_path):
    """Cancelled between the run's row and its first batch: the job names its run (so the run can
    be cancelled by its id), a restart leaves the run alone, and the same settings resume it."""
    from catalog.jobs.ingest import ingest

    db = tmp_path / "run-row.duckdb"
    settings = dict(model_path=str(tiny_checkpoint), n_prompts=6, batch_size=2, seed=11)
    with ServerProcess(db, args=allow(tiny_checkpoint), prelude=prelude("analysis", 3)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, **settings)
        _wait_for_log(server, "slow phase: analysis")
        named = wait_for(client, job["job_id"], lambda j: j["run_id"] is not None, timeout=30)
        assert named["status"] == "running" and named["prompts_by_job"] == 0, named
        assert client.delete(f"/api/v1/runs/{named['run_id']}").status_code == 202
        cancelled = wait_for(client, job["job_id"], lambda j: j["status"] not in ("queued", "running"))
        assert cancelled["status"] == "cancelled" and cancelled["prompts_by_job"] == 0, cancelled
        assert server.stop() == 0, server.log()
    with duckdb.connect(str(db), read_only=True) as con:  # the run's row, no batch, the job naming it
        assert con.execute("SELECT run_id, status, (SELECT count(*) FROM run_batches) FROM runs").fetchall() \
            == [(named["run_id"], "running", 0)]
        assert con.execute("SELECT status, run_id FROM service_jobs").fetchall() == [("cancelled", named["run_id"])]
    with ServerProcess(db, args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        jobs = client.get("/api/v1/jobs").json()
        assert [(j["status"], j["run_id"]) for j in jobs] == [("cancelled", named["run_id"])]  # not resumed
        again = wait_for(client, submit(client, **settings)["job_id"], lambda j: j["status"] in ("finished", "failed"))
        assert again["status"] == "finished" and again["summary"]["resumed"] is True, again
        assert again["run_id"] == named["run_id"] and again["prompts_by_job"] == 6, again
        assert server.stop() == 0, server.log()
    reference = tmp_path / "uncancelled.duckdb"
    ingest(reference, **settings)
    assert_same_run(db, reference, named["run_id"], 1)
