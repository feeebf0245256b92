"""bench_ingest.py --engine ray: the same ingest on 1, 2, ... Ray workers, against the local one.

What each row says, from the engine's per-batch timings (catalog.jobs.ray_engine: when a worker
began and ended a batch, its tables' bytes, when the driver received them) and the writer's
commits (Catalog.write_batch timed here):

  start s     the workers' start (Ray processes, imports, the model loaded), before any batch
  batches s   from the first batch begun to the last one received: the part that scales (local:
              the batch loop, analyses and commits in turn; the speed-up is against its rate)
  prompts/s   prompts / batches s
  per worker  prompts per second of one worker's analysis time (its compute, without overhead)
  idle/batch  worker time not spent analysing, per batch: scheduling, serialisation, transfer,
              and waiting on the writer
  MiB/batch   the tables a worker sends the driver per batch
  commit s    the writer's time per batch (one transaction); rows/s its ceiling: rows it commits
              per second of commit time, i.e. the rate no number of workers can exceed
"""

from __future__ import annotations

import logging
import time


def bench_ray(lm, n_prompts: int, worker_counts: list[int], args) -> list[dict]:
    """One local ingest (the baseline) and one Ray ingest per worker count; a row of numbers each."""
    import ray

    from catalog.jobs.ingest import ingest
    from catalog.jobs.ray_engine import RayEngine
    from catalog.jobs.settings import EngineSettings
    from catalog.store import Catalog

    commits: list[tuple[float, int]] = []  # (seconds, rows) per committed batch
    write_batch = Catalog.write_batch

    def timed_write(self, run_id, batch, first, last, tables):
        began = time.perf_counter()
        write_batch(self, run_id, batch, first, last, tables)
        commits.append((time.perf_counter() - began, sum(t.num_rows for t in tables.values() if t is not None)))

    Catalog.write_batch = timed_write
    # The local ingest's batch phase (its loop of analyses and commits), to set beside the workers'.
    import catalog.jobs.ingest as ingest_module

    run_batches, loop_s = ingest_module._run_batches, []

    def timed_run_batches(*a, **k):
        began = time.perf_counter()
        try:
            return run_batches(*a, **k)
        finally:
            loop_s.append(time.perf_counter() - began)

    ingest_module._run_batches = timed_run_batches
    rows = []
    ray.init(num_cpus=max(worker_counts), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        for workers in [0] + worker_counts:  # 0: the local ingest
            db = args.workdir / f"bench_ingest_ray{workers}_{n_prompts}.duckdb"
            for leftover in (db, db.with_name(db.name + ".wal")):
                leftover.unlink(missing_ok=True)
            engine = RayEngine(EngineSettings(engine="ray", workers=workers)) if workers else None
            commits.clear()
            print(f"ingesting {n_prompts} IOI prompts " + (f"on {workers} Ray worker(s)" if workers else "locally"),
                  flush=True)
            started = time.time()
            summary = ingest(db, model_path=lm.name, dataset="ioi", n_prompts=n_prompts, seed=0,
                             batch_size=args.batch_size, loaded_model=lm, engine=engine)
            rows.append(_row(workers, time.time() - started, summary, commits, engine, loop_s[-1]))
    finally:
        ray.shutdown()
        Catalog.write_batch, ingest_module._run_batches = write_batch, run_batches
    return rows


def _row(workers, wall_s, summary, commits, engine, loop_s) -> dict:
    commit_s, committed = sum(c[0] for c in commits), sum(c[1] for c in commits)
    row = dict(workers=workers, wall_s=wall_s, prompts=summary["prompts"], commit_s=commit_s / len(commits),
               writer_rows_s=committed / commit_s, rows_per_batch=committed / len(commits))
    if engine is None:
        return dict(row, batches_s=loop_s, start_s=0.0, per_worker=summary["prompts"] / loop_s, idle=None, mib=None)
    timings = engine.timings
    first, last = min(t["began"] for t in timings), max(t["received"] for t in timings)
    busy = sum(t["ended"] - t["began"] for t in timings)
    return dict(row, batches_s=last - first, start_s=wall_s - (last - first),
                per_worker=sum(t["prompts"] for t in timings) / busy,
                idle=((last - first) * workers - busy) / len(timings),
                mib=sum(t["bytes"] for t in timings) / len(timings) / 2**20)


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'workers':<8} {'wall s':>7} {'start s':>8} {'batches s':>9} {'prompts/s':>10} {'speed-up':>8} "
          f"{'per worker':>10} {'idle/batch':>10} {'MiB/batch':>9} {'commit s':>8} {'rows/batch':>10} {'writer rows/s':>13}")
    base = rows[0]["prompts"] / rows[0]["batches_s"]
    dash = lambda value, spec: "-" if value is None else format(value, spec)
    for r in rows:
        rate = r["prompts"] / r["batches_s"]
        print(f"{r['workers'] or 'local':<8} {r['wall_s']:>7.1f} {r['start_s']:>8.1f} {r['batches_s']:>9.1f} "
              f"{rate:>10.2f} {rate / base:>8.2f} {dash(r['per_worker'], '.2f'):>10} {dash(r['idle'], '.3f'):>10} "
              f"{dash(r['mib'], '.2f'):>9} {r['commit_s']:>8.3f} {r['rows_per_batch']:>10.0f} {r['writer_rows_s']:>13.0f}")
    print(__doc__.split("\n\n", 1)[1])
