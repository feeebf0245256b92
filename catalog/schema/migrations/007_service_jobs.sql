-- Version 7: the ingest jobs a service accepted (catalog.service.jobs), kept in the catalog it
-- owns, so that a restart loses no queued job and a job id keeps naming the same job. Only the
-- service writes this table; `circuit-catalog ingest` without --server never does.

CREATE TABLE service_jobs (
    job_id          INTEGER PRIMARY KEY,
    settings        JSON NOT NULL,        -- the ingest options as submitted (POST /api/v1/runs)
    reason          VARCHAR NOT NULL,     -- 'submitted' | 'resume' (queued by the service for an unfinished run)
    status          VARCHAR NOT NULL,     -- 'queued' | 'running' | 'finished' | 'failed' | 'interrupted' | 'cancelled'
                                          -- (free text: 'cancelled' came later with DELETE /api/v1/jobs/{id}, no schema change)
    run_id          INTEGER,              -- the run it works on, once known (no foreign key: a job may fail before one exists)
    message         VARCHAR,              -- why it failed or stopped, or a note on a finished job
    submitted_at    TIMESTAMP NOT NULL,
    started_at      TIMESTAMP,
    finished_at     TIMESTAMP,
    prompts_by_job  INTEGER NOT NULL DEFAULT 0,  -- prompts this job committed (a resumed run had some already)
    summary         JSON                  -- the ingest summary of a finished job
);
