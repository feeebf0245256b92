"""Jobs checked when submitted, cancelled, resumed after a cancel; and every stop stops (SIGTERM
and Ctrl-C to `serve` and to the CLI's `ingest` in each phase). Real processes on loopback ports
with the tiny checkpoint; every wait is on a condition with a deadline."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import duckdb
import httpx
import pytest

from catalog.testing.service import ServerProcess
from test_service_jobs import CONSISTENCY_SQL, allow, assert_same_run, submit, wait_for


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_checkpoint):
    db = tmp_path_factory.mktemp("control") / "control.duckdb"
    with ServerProcess(db, args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield server, client
        assert server.stop() == 0, server.log()


def _bad_submissions(checkpoint, outside):
    base = {"model_path": str(checkpoint)}
    cases = [
        (dict(base, n_prompts=1e12), "--n-prompts must be at most 100,000"),
        (dict(base, attn_threshold=5), "--attn-threshold must be in (0, 1]"),
        (dict(base, model_path=str(checkpoint / "missing")), "no such file or directory"),
        (dict(base, prompts_file="/etc/passwd"), "not inside a directory this service may read"),
        (dict(base, model_path=str(outside)), "not inside a directory this service may read"),
        ({"model": "/etc"}, "not inside a directory this service may read"),
        (dict(base, dataset="nope"), "unknown dataset 'nope'"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((dict(base, device="cuda"), "--device cuda: no CUDA GPU is usable here"))
    return cases


def test_each_bad_submission_answers_400_with_one_line(service, tiny_checkpoint, tmp_path):
    server, client = service
    before = client.get("/api/v1/jobs").json()
    for settings, says in _bad_submissions(tiny_checkpoint, tmp_path):
        response = client.post("/api/v1/runs", json=settings)
        assert response.status_code == 400, (settings, response.text)
        error = response.json()["error"]
        assert says in error and "\n" not in error, (settings, error)
        # The allowed directory is the server's own business: not in any answer.
        assert str(tiny_checkpoint.parent) not in error.replace(settings.get("model_path", ""), ""), error
    assert client.get("/api/v1/jobs").json() == before  # nothing was queued
    assert client.delete("/api/v1/jobs/999").status_code == 404


def test_cancel_a_queued_and_a_running_job_then_resume_to_the_same_rows(service, tiny_checkpoint, tmp_path):
    from catalog.jobs.ingest import ingest

    server, client = service
    settings = dict(model_path=str(tiny_checkpoint), n_prompts=40, batch_size=2, seed=21)
    running = submit(client, **settings)
    waiting = submit(client, **dict(settings, seed=22))
    cancelled = client.delete(f"/api/v1/jobs/{waiting['job_id']}")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled", cancelled.text
    wait_for(client, running["job_id"], lambda j: j["prompts_by_job"] >= 4)
    assert client.delete(f"/api/v1/jobs/{running['job_id']}").status_code == 202
    stopped = wait_for(client, running["job_id"], lambda j: j["status"] != "running", timeout=60)
    assert stopped["status"] == "cancelled" and "resumes" in stopped["message"], stopped
    assert str(server.db_path) not in stopped["message"]
    assert 4 <= stopped["prompts_by_job"] < 40
    assert client.get(f"/api/v1/jobs/{waiting['job_id']}").json()["status"] == "cancelled"  # never started
    assert client.delete(f"/api/v1/jobs/{running['job_id']}").status_code == 400  # already ended
    # Committed batches stayed; the same settings again resume the run to an uninterrupted one's rows.
    again = wait_for(client, submit(client, **settings)["job_id"], lambda j: j["status"] in ("finished", "failed"))
    assert again["status"] == "finished" and again["summary"]["resumed"] is True, again
    assert again["run_id"] == stopped["run_id"] and again["prompts_by_job"] == 40 - stopped["prompts_by_job"]
    rows = client.post("/api/v1/sql", json={"sql": CONSISTENCY_SQL}).json()["rows"][0]
    assert (rows["firings"], rows["edges"]) == (rows["batch_firings"], rows["batch_edges"])
    reference = tmp_path / "whole.duckdb"
    ingest(reference, **settings)
    server.stop()  # release the catalog file to compare it (the fixture's stop then finds it ended)
    assert_same_run(server.db_path, reference, stopped["run_id"], 1)


def test_a_running_job_is_cancelled_during_prompt_generation(tiny_checkpoint, tmp_path):
    with ServerProcess(tmp_path / "gen.duckdb", args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, model_path=str(tiny_checkpoint), n_prompts=100_000, batch_size=50_000)
        wait_for(client, job["job_id"], lambda j: j["status"] == "running")
        asked = time.monotonic()
        client.delete(f"/api/v1/jobs/{job['job_id']}")
        done = wait_for(client, job["job_id"], lambda j: j["status"] != "running", timeout=30)
        assert done["status"] == "cancelled" and time.monotonic() - asked < 30, done
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_promptly_while_a_job_generates_prompts(tiny_checkpoint, tmp_path, sig):
    db = tmp_path / "stop.duckdb"
    with ServerProcess(db, args=allow(tiny_checkpoint)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        job = submit(client, model_path=str(tiny_checkpoint), n_prompts=100_000, batch_size=50_000)
        wait_for(client, job["job_id"], lambda j: j["status"] == "running")
        asked = time.monotonic()
        assert server.stop(timeout=30, sig=sig) == (130 if sig == signal.SIGINT else 0), server.log()
        assert time.monotonic() - asked < 30 and "stopped by" in server.log()
    with duckdb.connect(str(db), read_only=True) as con:  # intact, the job's end recorded
        assert con.execute("SELECT status FROM service_jobs").fetchall() == [("interrupted",)]


def _ingest_process(db, checkpoint, *args):
    command = [sys.executable, "-c", "from catalog.cli import entry; entry()", "ingest", "--db", str(db),
               "--model-path", str(checkpoint), *args]
    # A terminal's Ctrl-C: SIGINT handled by default in the child, even where this test runs as a
    # background job (a shell starts those with SIGINT ignored, and Python then keeps it ignored).
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_line(process, fragment: str, timeout: float = 300) -> list[str]:
    """Read stderr until a line holds `fragment`, a regular expression (tqdm's bar ends its repaints
    with \\r)."""
    import os
    import re
    import select

    deadline, seen, buffer = time.monotonic() + timeout, [], ""
    fd = process.stderr.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096).decode(errors="replace")
            if not chunk:
                break
            buffer += chunk
            if re.search(fragment, buffer):
                return buffer
    process.kill()
    raise AssertionError(f"no {fragment!r} within {timeout} s: {buffer[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_ingest_stops_during_prompt_generation(tiny_checkpoint, tmp_path, sig):
    process = _ingest_process(tmp_path / "cli.duckdb", tiny_checkpoint, "--n-prompts", "100000")
    try:
        _wait_for_line(process, "loading model")  # then the load and 100,000 prompts: a while
        process.send_signal(sig)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "loading model" not in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_ingest_stops_during_a_batch_and_resumes(tiny_checkpoint, tmp_path, sig):
    db = tmp_path / "batch.duckdb"
    args = ("--n-prompts", "64", "--batch-size", "2", "--seed", "3")
    process = _ingest_process(db, tiny_checkpoint, *args)
    try:
        _wait_for_line(process, r"\b[1-9][0-9]*/64")  # the progress bar: a batch is saved, more are coming
        process.send_signal(sig)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "prompts of run 1 are saved" in err.splitlines()[-1], err
    again = _ingest_process(db, tiny_checkpoint, *args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resumed" in out, err
