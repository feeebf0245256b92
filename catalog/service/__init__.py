"""The catalog as a service: one process owns a catalog file, answers reads over HTTP and runs
ingest jobs in a worker thread.

DuckDB lets one process write or several read, never both, so readers and an ingest cannot
share a file from separate processes. The service opens the file read-write once
(`connection.ServiceCatalog`), serves every request on its own cursor of that connection (a
cursor sees only committed batches), and runs ingest jobs (`jobs.JobQueue`) in the same process,
where `catalog.store.Catalog(path)` reuses the same DuckDB instance.

Modules: connection (the open catalog), jobs (ingest queue), api (the /api/v1/ routes), sql
(the locked-down SQL endpoint), app (the FastAPI app: errors, explorer's static files), auth
(the token), marker (the file that tells other processes the catalog is held), server (uvicorn,
signals), client (`circuit-catalog ingest --server URL`), launch (a server as a child process,
for tests and the benchmark). static/ is the explorer: plain HTML, CSS and JavaScript.

Nothing here imports torch; an ingest job imports it when it starts.
"""

TOKEN_ENV = "CIRCUIT_CATALOG_TOKEN"   # the service token, when --token is not given
