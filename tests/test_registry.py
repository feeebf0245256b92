"""The method registry: one entry per method, each naming what exists, and no torch to ask it."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest

from catalog.errors import CatalogError
from catalog.methods import DEFAULT, NAMES, REGISTRY, method

METHODS = list(REGISTRY.values())


def test_names_are_unique_and_the_default_is_registered():
    assert len(set(NAMES)) == len(NAMES) == len(METHODS)
    assert DEFAULT in NAMES and method(None).name == DEFAULT


def test_an_unknown_method_is_one_line_naming_the_known_ones():
    with pytest.raises(CatalogError) as err:
        method("greedy")
    assert str(err.value).startswith("unknown method 'greedy': use sad (") and "accpp (" in str(err.value)


@pytest.mark.parametrize("entry", METHODS, ids=[m.name for m in METHODS])
def test_settings_are_option_dataclasses_that_record_themselves(entry):
    assert dataclasses.is_dataclass(entry.settings)
    from catalog.settings import build

    made = build(entry.settings, {"heads": "1.0"} if entry.name == "accpp" else {})
    # every method names the same runs columns (NULL where they are not its own), so that a run is
    # found by them whatever its method
    assert set(made.columns()) == {"attn_threshold", "sv_threshold", "edge_threshold", "append_constant",
                                   "sink_attention", "sink_head_share", "sink_min_heads", "keep_sinks"}
    record = made.record()
    assert record is None or isinstance(record, dict)


@pytest.mark.parametrize("entry", METHODS, ids=[m.name for m in METHODS])
def test_analysis_is_importable(entry):
    module, _, function = entry.analysis.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    assert entry.load_analysis() is getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("entry", METHODS, ids=[m.name for m in METHODS])
def test_tables_and_weight_unit_exist_in_a_fresh_catalog(entry, tmp_path):
    from catalog.store import Catalog

    with Catalog(tmp_path / "fresh.duckdb") as cat:
        tables = {name for (name,) in cat.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        units = cat.con.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_name = 'runs' AND column_name = 'weight_unit'"
        ).fetchall()
    assert set(entry.tables) <= tables, set(entry.tables) - tables
    assert units, "runs.weight_unit is missing"
    assert entry.weight_unit in ("score", "attn_prob")


def test_summary_detail_reads_the_summary():
    summary = {"firings": 12, "mean_signal_size": 2.5, "edges": 30, "seeds": 4}
    assert method("sad").summary_detail(summary) == "12 firings, mean signal size 2.50 singular vectors, 30 edges"
    assert method("accpp").summary_detail(summary) == "12 firings decomposed, 4 seeds, 30 edges"


def test_the_registry_settings_and_the_library_entry_import_no_torch():
    """The read side, the CLI and the service ask the registry what a method is: that must not
    load torch (seconds), nor must `import catalog` or its settings classes."""
    code = ("import sys, catalog, catalog.methods, catalog.settings, catalog.jobs.settings; "
            "catalog.IngestSettings, catalog.SadSettings, catalog.AccppSettings; "
            "[m.settings for m in catalog.methods.REGISTRY.values()]; "
            "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
