"""One error convention everywhere: a user mistake, click's own usage errors included, prints one
line `error: ...` on stderr and exits with status 1."""

import json

import pytest
from click.testing import CliRunner

from catalog.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, *words):
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert result.stdout == ""  # the line goes to stderr
    assert "Traceback" not in result.output and "Usage:" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["edges", "--db", "{db}", "--into", "1.1", "--top", "0"], ["--top", "0"]),
    (["head", "--db", "{db}", "1.1", "--top", "-3"], ["--top"]),
    (["edges", "--into", "1.1"], ["--db"]),                            # a missing required option
    (["sql", "--db", "{db}", "SELECT 1", "--format", "xml"], ["--format", "xml"]),
    (["edges", "--db", "{db}", "--into", "1.1", "--side", "up"], ["--side"]),
    (["trace", "--db", "{db}", "--prompt", "first"], ["--prompt"]),
    (["head", "--db", "{db}"], ["HEAD"]),                             # a missing argument
    (["edges", "--db", "{db}", "--into", "1.1", "--bogus"], ["--bogus"]),
    (["no-such-command"], ["no-such-command"]),
    (["ingest", "--db", "{tmp}/x.duckdb", "--method", "magic"], ["--method"]),
    (["ingest", "--db", "{tmp}/x.duckdb", "--n-prompts", "0"], ["--n-prompts"]),
    (["edges", "--db", "{db}", "--into", "99.0"], ["99"]),            # the catalog's own errors, as before
    (["heads", "--db", "{db}", "--run", "99"], ["run 99"]),
    (["diff", "--db", "{db}", "--run", "1"], ["--run"]),
])
def test_bad_options_print_one_error_line_and_exit_1(catalog_db, tmp_path, args, words):
    args = [a.format(db=catalog_db, tmp=tmp_path) for a in args]
    assert_one_error_line(invoke(*args), *words)
    assert not (tmp_path / "x.duckdb").exists()


def test_help_and_version_are_not_errors():
    for args in (["--help"], ["edges", "--help"], ["--version"], []):
        result = invoke(*args)
        assert result.exit_code == 0 and "error" not in result.output.lower(), result.output
    assert "Usage:" in invoke().output


def test_sql_runs_one_statement_per_call(catalog_db):
    assert_one_error_line(invoke("sql", "--db", catalog_db, "SELECT 1 AS a; SELECT 2 AS a"),
                          "one statement per call", "2")
    one = invoke("sql", "--db", catalog_db, "SELECT 1 AS a;", "--format", "json")
    assert one.exit_code == 0 and json.loads(one.stdout) == [{"a": 1}]
    # nothing runs when one of several statements would write
    assert_one_error_line(invoke("sql", "--db", catalog_db, "SELECT 1; DELETE FROM runs"), "refused")


def test_a_bad_jsonl_line_is_named_before_the_model_is_loaded(tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("catalog.models.loading.load_model", no_load)
    prompts = tmp_path / "p.jsonl"
    good = json.dumps({"text": "When Mary and John went to the store", "roles": {"IO": 1}})
    prompts.write_text("\n".join([good, "", '{"text": "unfinished', good]) + "\n")
    db = tmp_path / "c.duckdb"
    result = invoke("ingest", "--db", db, "--model-path", tmp_path, "--prompts", prompts)
    assert_one_error_line(result, f"{prompts}, line 3", "not valid JSON")
    prompts.write_text("\n".join([good, json.dumps({"text": "x", "roles": {"IO": -1}})]) + "\n")
    assert_one_error_line(invoke("ingest", "--db", db, "--model-path", tmp_path, "--prompts", prompts), "line 2")
    assert not db.exists()


def test_export_refuses_to_overwrite_a_directory_unless_forced(catalog_db, tmp_path):
    out = tmp_path / "parquet"
    first = invoke("export", "--db", catalog_db, out)
    assert first.exit_code == 0, first.output
    runs = out / "runs.parquet"
    runs.write_bytes(b"not parquet")  # to see whether the next export writes it
    assert_one_error_line(invoke("export", "--db", catalog_db, out), str(out), "--force")
    assert runs.read_bytes() == b"not parquet"
    forced = invoke("export", "--db", catalog_db, out, "--force")
    assert forced.exit_code == 0, forced.output
    assert runs.read_bytes().startswith(b"PAR1")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("export", "--db", catalog_db, empty).exit_code == 0 and (empty / "runs.parquet").exists()
