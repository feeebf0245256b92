"""What a submitted ingest job must pass before the service answers 202 (else 400, one line).

The checks are the job layer's own, called here rather than restated: the settings dataclasses'
rules and the method's (catalog.jobs.ingest.resolve_settings, i.e. catalog.settings.build), the
device (catalog.models.loading.resolve_device), the checkpoint's family (check_family) and the
prompts file or dataset (catalog.jobs.ingest.file_prompts). On top come the service's own limits, which the CLI
does not need because its user owns the machine: a maximum prompt count, and file paths only
inside the directories the operator names (`serve --allow-dir`). Error lines name a path only as
the client gave it, never as the server resolved it.
"""

from __future__ import annotations

import os
from pathlib import Path

from catalog.errors import CatalogError

DEFAULT_MAX_PROMPTS = 100_000


def check_job(settings, allowed_dirs: list[Path], max_prompts: int = DEFAULT_MAX_PROMPTS) -> None:
    """Raise one CatalogError line unless the job `settings` (catalog.service.jobs.IngestSettings)
    could run here as the CLI's ingest would run them."""
    from catalog.jobs.ingest import file_prompts, resolve_settings
    from catalog.models.loading import check_family, resolve_device
    from catalog.service.jobs import ingest_keywords

    if getattr(settings, "probe", None) is not None:  # before the settings read the probe file
        _check_inside(str(settings.probe), "--probe", allowed_dirs)
    job, chosen, method_settings = resolve_settings(**ingest_keywords(settings))
    if job.n_prompts > max_prompts:
        raise CatalogError(f"--n-prompts must be at most {max_prompts:,} in this service, got {job.n_prompts:,}")
    if job.model_path is not None:
        given = str(settings.model_path)
        _check_inside(given, "--model-path", allowed_dirs)
        if not Path(given).expanduser().exists():
            raise CatalogError(f"--model-path {given}: no such file or directory")
        config = check_family(job.model, Path(given).expanduser())
        if config is not None and chosen.check_config is not None:
            chosen.check_config(method_settings, config)  # e.g. --heads the checkpoint lacks
    elif _names_a_local_path(job.model):  # Hugging Face loads a local directory given as a model name
        _check_inside(job.model, "--model", allowed_dirs)
    resolve_device(job.device)
    if job.prompts_file is not None:
        _check_inside(str(settings.prompts_file), "--prompts", allowed_dirs)
    items = file_prompts(job)  # read as the job will read it; the dataset checked when there is no file
    if items is not None and len(items) > max_prompts:
        raise CatalogError(f"--prompts {settings.prompts_file}: {len(items):,} prompts, more than this "
                           f"service's limit of {max_prompts:,}")


def _names_a_local_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or Path(model).exists()


def _check_inside(given: str, flag: str, allowed_dirs: list[Path]) -> None:
    """The path as resolved (symbolic links and '..' followed) must lie inside an allowed directory."""
    if not allowed_dirs:
        raise CatalogError(f"{flag} {given}: this service reads no files for jobs (its operator allows "
                           "directories with `serve --allow-dir DIR`)")
    resolved = Path(given).expanduser().resolve()
    if not any(resolved.is_relative_to(Path(directory).resolve()) for directory in allowed_dirs):
        raise CatalogError(f"{flag} {given}: not inside a directory this service may read "
                           "(its operator allows them with `serve --allow-dir DIR`)")
