"""`circuit-catalog ingest --server URL`: submit an ingest job to a running service and follow it.

Standard library HTTP only (urllib), so the CLI needs nothing extra. The token, if the service
has one, comes from the CIRCUIT_CATALOG_TOKEN environment variable.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from catalog.errors import CatalogError
from catalog.service import TOKEN_ENV

POLL_S = 0.5


def call(url: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 30) -> dict:
    """One JSON request; the service's one-line error becomes a CatalogError."""
    request = urllib.request.Request(url.rstrip("/") + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            message = err.reason
        raise CatalogError(f"the service at {url} answered {err.code}: {message}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CatalogError(f"no circuit-catalog service at {url} ({getattr(err, 'reason', err)})") from None


def submit_and_follow(url: str, settings: dict, show_progress: bool = True) -> dict:
    """Submit `settings` (ingest's options) as a job, follow it to the end, return its summary."""
    from tqdm import tqdm

    from catalog.jobs.ingest import progress_postfix

    token = os.environ.get(TOKEN_ENV)
    for key in ("model_path", "prompts_file"):  # the service resolves paths from its own directory
        if settings.get(key) is not None:
            settings[key] = str(Path(settings[key]).resolve())
    job = call(url, "/api/v1/runs", settings, token)
    bar = None
    try:
        while job["status"] in ("queued", "running"):
            time.sleep(POLL_S)
            job = call(url, f"/api/v1/jobs/{job['job_id']}", token=token)
            progress = job.get("progress")
            if progress and show_progress:
                if bar is None:
                    bar = tqdm(total=progress["n_prompts"], unit="prompt", dynamic_ncols=True,
                               desc=f"run {progress['run_id']} (job {job['job_id']} at {url})")
                # counts as plain integers, set before the prompts move so the repaint is current
                bar.set_postfix_str(progress_postfix(progress["firings"], progress["edges"]), refresh=False)
                if not bar.update(progress["prompts_done"] - bar.n):
                    bar.refresh()
    except KeyboardInterrupt:
        raise CatalogError(f"stopped following; job {job['job_id']} goes on in the service: "
                           f"{url.rstrip('/')}/api/v1/jobs/{job['job_id']}") from None
    finally:
        if bar is not None:
            bar.close()
    if job["status"] != "finished":
        raise CatalogError(job.get("message") or f"job {job['job_id']} ended as {job['status']}")
    return dict(job["summary"], db=url)
