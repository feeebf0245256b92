"""`ingest --engine ray`: batches analysed by Ray workers, committed by the driver alone.

One local Ray cluster of 2 CPUs serves the whole module (Ray takes seconds to start): tests in
this process use it directly, the command-line runs in subprocesses join it by address. The
catalogs are compared with the local ingest's by scripts/compare_catalogs.py, every table row
for row, floats exactly (the same code runs on the same CPU, only in other processes)."""

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from catalog.cli import main  # noqa: E402
from catalog.jobs.ingest import ingest  # noqa: E402
from catalog.jobs.ray_engine import RayEngine  # noqa: E402
from catalog.jobs.settings import EngineSettings  # noqa: E402

COMPARE = Path(__file__).resolve().parents[1] / "scripts" / "compare_catalogs.py"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module: its address, for subprocesses to join."""
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _same_catalogs(a, b):
    result = subprocess.run([sys.executable, str(COMPARE), str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def _engine(**settings):
    return RayEngine(EngineSettings(engine="ray", workers=2, **settings))


def _count(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()[0][0]


@pytest.mark.parametrize("method, extra, batch_size, kill_a_worker", [
    ("sad", {}, 1, True), ("accpp", {"ig_steps": 4, "heads": "2.0,2.1"}, 2, False)])
def test_a_ray_ingest_is_the_local_ingest_row_for_row(tmp_path, tiny_checkpoint, cluster, method, extra,
                                                      batch_size, kill_a_worker):
    """Also, for the 2024 method: a worker killed (kill -9) after the first commit is restarted by
    Ray and its batches run again, none lost and none committed twice. (With 10 batches, batches
    are still waiting when the killed worker's results come back, so the restarted worker gets
    some: the workers are each sent a batch per result received.)"""
    args = dict(model_path=tiny_checkpoint, n_prompts=10, seed=5, batch_size=batch_size, method=method, **extra)
    local, on_ray = tmp_path / "local.duckdb", tmp_path / "ray.duckdb"
    ingest(local, **args)
    engine, started = _engine(), []

    def kill_first_worker(batch):
        if kill_a_worker and not started:
            started.extend(ray.get([worker.pid.remote() for worker in engine.workers]))
            os.kill(started[0], signal.SIGKILL)

    summary = ingest(on_ray, engine=engine, on_batch=kill_first_worker, **args)
    assert summary["prompts"] == 10 and summary["firings"] > 0 and summary["edges"] > 0
    lines = _same_catalogs(local, on_ray)
    assert "firings: same" in lines and "edges: same" in lines
    assert _count(on_ray, "SELECT count(*) FROM run_batches") == 10 // batch_size
    if kill_a_worker:  # a restarted worker (another process) analysed some of the batches
        assert {t["pid"] for t in engine.timings} - set(started)


def _cli(*args):
    return [sys.executable, "-c", "from catalog.cli import entry; entry()", *args]


def _start_and_wait(argv, n, at_least):
    """Start an ingest subprocess; return it once its progress bar shows >= at_least of n prompts
    (a terminal's Ctrl-C: SIGINT handled by default even when this test runs in the background)."""
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                              signal.SIG_DFL))
    seen, deadline = b"", time.time() + 600  # generous: a loaded 2-core machine takes minutes
    os.set_blocking(process.stderr.fileno(), False)
    while time.time() < deadline and process.poll() is None:
        seen += process.stderr.read() or b""
        done = [int(k) for k in re.findall(rb"(\d+)/%d " % n, seen)]
        if done and max(done) >= at_least:
            return process, seen
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the ingest never showed {at_least}/{n} prompts: {seen.decode(errors='replace')}")


def test_ctrl_c_then_kill_9_of_the_driver_then_the_same_command_finishes_the_same_catalog(tmp_path, tiny_checkpoint,
                                                                                          cluster):
    """One run interrupted twice, the same command each time: Ctrl-C (the workers stop, what is
    committed stays, one bar over the run), then kill -9 of the resumed command, then the command
    once more: the catalog of an uninterrupted local ingest."""
    n = 40
    whole, db = tmp_path / "whole.duckdb", tmp_path / "c.duckdb"
    ingest(whole, model_path=tiny_checkpoint, n_prompts=n, batch_size=2, seed=11)
    argv = _cli("ingest", "--db", str(db), "--model-path", str(tiny_checkpoint), "--n-prompts", str(n),
                "--batch-size", "2", "--seed", "11", "--engine", "ray", "--ray-address", cluster)

    process, seen = _start_and_wait(argv, n, 4)
    process.send_signal(signal.SIGINT)
    os.set_blocking(process.stderr.fileno(), True)
    seen += process.stderr.read()
    assert process.wait(timeout=60) == 130
    last = seen.decode().strip().splitlines()[-1]
    saved = _count(db, "SELECT count(*) FROM run_batches")
    assert re.fullmatch(rf"interrupted: {2 * saved} of {n} prompts of run 1 are saved in .*; run the same command "
                        r"again to resume", last), last
    assert saved < n // 2, "the ingest finished before it could be interrupted"
    assert _count(db, "SELECT count(*) FROM firings WHERE prompt_id NOT IN "
                      "(SELECT unnest(range(first_prompt, last_prompt + 1)) FROM run_batches)") == 0
    # One progress bar over the run: every repaint is of run 1's bar out of n prompts.
    bars = re.findall(rb"run (\d+)[^:]*: +\d+%\|[^|]*\| *\d+/(\d+) ", seen)
    assert bars and set(bars) == {(b"1", str(n).encode())}
    # The workers went with the driver: the cluster's 2 CPUs are free again.
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2

    process, _ = _start_and_wait(argv, n, 2 * saved + 4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _count(db, "SELECT count(*) FROM run_batches")
    assert saved < killed_at < n // 2, "the ingest finished before it could be killed"

    summary = ingest(db, engine=_engine(), model_path=tiny_checkpoint, n_prompts=n, batch_size=2, seed=11)
    assert summary["resumed"] and summary["prompts_this_session"] == n - 2 * killed_at
    _same_catalogs(whole, db)


def test_a_workers_exception_is_one_error_line_naming_the_batch(tmp_path, tiny_checkpoint, cluster, monkeypatch):
    import catalog.jobs.ray_engine as ray_engine

    failing = "catalog.testing.faults:sad_analysis_failing_on_prompt_4"
    monkeypatch.setattr(ray_engine, "RayEngine", functools.partial(RayEngine, analysis=failing))
    db = tmp_path / "c.duckdb"
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint),
                                       "--n-prompts", "8", "--batch-size", "2", "--engine", "ray", "--workers", "1"])
    # stderr only: Ray's own notes (a task of an ended worker "will be retried") go to stdout.
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "error: batch 2 (prompts 4-5) failed on a Ray worker: ValueError: made to fail on prompt 4")
    assert 2 not in {r[0] for r in duckdb.connect(str(db), read_only=True).execute(
        "SELECT batch FROM run_batches").fetchall()}


def test_ray_options_need_engine_ray(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path",
                                       str(tiny_checkpoint), "--workers", "3"])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == "error: --workers applies to --engine ray"


def test_nothing_imports_ray_unless_asked():
    """Ray is optional and slow to import: the command line, the jobs and the service import it only
    for --engine ray."""
    code = ("import sys, catalog.cli, catalog.jobs.ingest, catalog.jobs.intervene, catalog.jobs.ray_engine, "
            "catalog.service.api; print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
