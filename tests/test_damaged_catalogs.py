"""A damaged, truncated, foreign or unwritable catalog: one `error:` line from every command, `serve`
refuses to start, and an ingest says so before any model is loaded."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import subprocess
import sys
from collections import namedtuple

import pytest

from _catalog_fixture import invoke


def truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])


def flipped(src, dst):
    data = bytearray(src.read_bytes())
    for i in range(64 * 1024, len(data), 4093):  # past the headers: every block gets damaged
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))


def sqlite_file(src, dst):
    con = sqlite3.connect(dst)
    con.execute("CREATE TABLE runs (run_id INTEGER)")
    con.commit()
    con.close()


def garbage(src, dst):
    dst.write_bytes(b"this is not a database at all\n" * 100)


DAMAGES = {"truncated": truncated, "flipped": flipped, "sqlite": sqlite_file, "garbage": garbage}
COMMANDS = [["heads", "--db", "{db}"], ["edges", "--db", "{db}", "--into", "1.0"], ["trace", "--db", "{db}"],
            ["export", "--db", "{db}", "{tmp}/out"], ["sql", "--db", "{db}", "SELECT count(*) FROM edges"],
            ["head", "--db", "{db}", "1.0"]]


def assert_one_error_line(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_says_one_line(catalog_db, tmp_path, damage, command):
    db = tmp_path / "damaged.duckdb"
    DAMAGES[damage](catalog_db, db)
    assert_one_error_line(invoke(*[a.format(db=db, tmp=tmp_path) for a in command]))


@pytest.mark.parametrize("damage", DAMAGES)
def test_ingest_says_one_line_before_loading_a_model(catalog_db, tmp_path, damage, monkeypatch):
    monkeypatch.setattr("catalog.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    db = tmp_path / "damaged.duckdb"
    DAMAGES[damage](catalog_db, db)
    before = db.read_bytes()
    assert_one_error_line(invoke("ingest", "--db", db, "--model-path", tmp_path, "--n-prompts", "2"))
    assert db.read_bytes() == before


@pytest.mark.parametrize("damage", DAMAGES)
def test_serve_refuses_to_start(catalog_db, tmp_path, damage):
    db = tmp_path / "damaged.duckdb"
    DAMAGES[damage](catalog_db, db)
    done = subprocess.run([sys.executable, "-c", "from catalog.cli import entry; entry()", "serve", "--db", str(db),
                           "--port", "0", "--token", "t"], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr


Failure = namedtuple("Failure", "errno words")


@pytest.mark.parametrize("failure", [Failure(errno.ENOSPC, "disk is full"), Failure(errno.EROFS, "read-only"),
                                     Failure(errno.EACCES, "permission denied")], ids=lambda f: f.words)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_unwritable_folder_is_said_before_the_model_loads(catalog_db, tmp_path, monkeypatch, failure, existing):
    """A full disk, a read-only mount, a folder without write permission (simulated: the tests may
    run as root, whom permissions do not stop)."""
    db = tmp_path / "c.duckdb"
    if existing:
        shutil.copy(catalog_db, db)

    def refuse(*args, **kwargs):
        raise OSError(failure.errno, "simulated")

    monkeypatch.setattr("tempfile.NamedTemporaryFile", refuse)
    monkeypatch.setattr("catalog.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = invoke("ingest", "--db", db, "--model-path", tmp_path, "--n-prompts", "2")
    assert_one_error_line(result)
    assert failure.words in result.output
    assert db.exists() == existing


def test_a_nearly_full_disk_is_said_before_the_model_loads(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage._replace(free=1024 * 1024))
    monkeypatch.setattr("catalog.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = invoke("ingest", "--db", tmp_path / "c.duckdb", "--model-path", tmp_path, "--n-prompts", "2")
    assert_one_error_line(result)
    assert "1 MB free" in result.output
