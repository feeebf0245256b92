"""Shared fixtures: small GPT-2-architecture checkpoints built offline, and ../shared when present."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ATTN_WEIGHTS = SHARED / "gpt2-small-attention" / "gpt2-small-attention.safetensors"
REFERENCE = SHARED / "reference" / "ioi16-attn-real"

# The fast unit tests of one layer each (`pytest -m unit`, well under a minute): settings and the
# method registry, the schema's types, the import contracts, SQL fragments and the read-only SQL
# rule, output formats, the catalog comparison script. Everything else builds a model or a catalog.
UNIT_MODULES = {"test_settings", "test_registry", "test_schema_types", "test_architecture", "test_fragments",
                "test_formats", "test_compare_catalogs", "test_sql_escapes"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _servers_stopped():
    """A test that fails half-way leaves no `serve` process behind: the servers it started (not a
    module fixture's, which start before it) are killed when it ends, whatever happened."""
    from catalog.testing.service import ServerProcess

    before = len(ServerProcess.started)
    yield
    for server in ServerProcess.started[before:]:
        server.kill()
    del ServerProcess.started[before:]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 3-layer, 4-head GPT-2 with GPT-2's real tokenizer."""
    from catalog.testing import save_random_gpt2

    return save_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_layer=3, n_head=4, n_embd=64)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from catalog.models.loading import load_model

    return load_model(path=tiny_checkpoint)


@pytest.fixture(scope="session")
def attn_real_checkpoint(tmp_path_factory) -> Path:
    """GPT-2 small with the real attention weights of ../shared (the reference's model)."""
    if not ATTN_WEIGHTS.exists():
        pytest.skip(f"{ATTN_WEIGHTS} is absent: the real GPT-2 attention weights are not available here")
    from catalog.testing import save_attn_real_gpt2

    return save_attn_real_gpt2(tmp_path_factory.mktemp("attn-real"), ATTN_WEIGHTS)


@pytest.fixture(scope="session")
def attn_real_model(attn_real_checkpoint):
    from catalog.models.loading import load_model

    return load_model(path=attn_real_checkpoint)


@pytest.fixture(scope="session")
def catalog_db(tiny_checkpoint, tmp_path_factory) -> Path:
    """The catalog test_query.py and test_trace.py read (see tests/_catalog_fixture.py): two IOI
    runs through the real ingest, run 1 (4 prompts, seed 1) and run 2 (8 prompts, seed 0)."""
    from catalog.jobs.ingest import ingest

    db = tmp_path_factory.mktemp("query-catalog") / "ioi.duckdb"
    older = ingest(db, model_path=tiny_checkpoint, dataset="ioi", n_prompts=4, seed=1, batch_size=4)
    latest = ingest(db, model_path=tiny_checkpoint, dataset="ioi", n_prompts=8, seed=0, batch_size=4)
    assert (older["run_id"], latest["run_id"]) == (1, 2)
    return db


_exit_status = {}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave right after pytest's summary: once torch and DuckDB 2 share a process, Python's
    module teardown makes DuckDB's nanobind bindings print a wall of benign "leaked instances"
    lines, which would bury the summary (the CLI exits the same way, see catalog.cli.entry)."""
    import os
    import sys

    if "torch" in sys.modules and "code" in _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status["code"])
