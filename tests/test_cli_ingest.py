"""The ingest and decompose commands end to end: bad input, one model per catalog, kill -9 and resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import duckdb
import pytest
from click.testing import CliRunner

from catalog.cli import main
from catalog.jobs.ingest import ingest


def _error_line(result):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[-1]


def test_decompose_stores_every_head_once(tmp_path, tiny_checkpoint):
    db = tmp_path / "c.duckdb"
    first = CliRunner().invoke(main, ["decompose", "--db", str(db), "--model-path", str(tiny_checkpoint)])
    assert first.exit_code == 0 and "decomposed and stored" in first.output, first.output
    again = CliRunner().invoke(main, ["decompose", "--db", str(db), "--model-path", str(tiny_checkpoint)])
    assert again.exit_code == 0 and "reused" in again.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT weights_digest) FROM models").fetchall() == [(1, 1)]
    n, lengths = con.execute("SELECT count(*), list(DISTINCT len(u)) FROM singular_vectors").fetchall()[0]
    assert n == 3 * 4 * 16 and lengths == [64 + 1]  # layers x heads x d_head, vectors of d_model + 1
    con.close()


def test_a_second_model_is_refused_unless_asked_for(tmp_path, tiny_model, tiny_checkpoint):
    from catalog.testing import save_random_gpt2

    db = tmp_path / "c.duckdb"
    ingest(db, model_path=tiny_checkpoint, n_prompts=2, batch_size=2, loaded_model=tiny_model)
    other = save_random_gpt2(tmp_path / "other", n_layer=2, n_head=2, n_embd=32, seed=7)
    before = (db.read_bytes())
    message = _error_line(CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(other),
                                                   "--n-prompts", "2"]))
    assert "was built from model" in message and "--add-model" in message
    assert db.read_bytes() == before
    ok = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(other), "--n-prompts", "2",
                                   "--add-model"])
    assert ok.exit_code == 0, ok.output
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM models").fetchall()[0][0] == 2
    con.close()


@pytest.mark.parametrize("lines, message", [
    ([{"text": "When Mary and John went", "roles": {"IO": 1, "end": 40}}], "role end at position 40 is outside"),
    (["not json"], "line 1"),
    ([{"roles": {"IO": 1}}], "line 1"),
    ([{"text": "Hello there", "tokens": ["Hello", " world"]}], "prompt 0"),
])
def test_prompts_that_do_not_tokenize_as_the_file_says(tmp_path, tiny_checkpoint, lines, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    db = tmp_path / "c.duckdb"
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint),
                                       "--prompts", str(prompts)])
    assert message in _error_line(result)
    assert not db.exists()  # prompts are checked before anything is stored


@pytest.mark.parametrize("args, message", [
    (["--model-path", "{tmp}/nowhere"], "not a checkpoint directory"),
    (["--attn-threshold", "1.5"], "--attn-threshold"),
    (["--dataset", "squad"], "unknown dataset"),
])
def test_ingest_bad_arguments(tmp_path, tiny_checkpoint, args, message):
    argv = ["ingest", "--db", str(tmp_path / "c.duckdb"), "--model-path", str(tiny_checkpoint), "--n-prompts", "2"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert message in _error_line(CliRunner().invoke(main, argv))


def test_offline_hub_model_names_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    result = CliRunner().invoke(main, ["decompose", "--db", str(tmp_path / "c.duckdb"), "--model", "gpt2"])
    assert "--model-path" in _error_line(result)


def _cli(*args):
    return [sys.executable, "-c", "from catalog.cli import entry; entry()", *args]


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_an_identical_catalog(tmp_path, tiny_checkpoint):
    from test_ingest import _snapshot

    common = ["--model-path", str(tiny_checkpoint), "--n-prompts", "40", "--batch-size", "2", "--seed", "11"]
    whole = tmp_path / "whole.duckdb"
    subprocess.run(_cli("ingest", "--db", str(whole), *common), check=True, capture_output=True)

    killed = tmp_path / "killed.duckdb"
    process = subprocess.Popen(_cli("ingest", "--db", str(killed), *common), stderr=subprocess.PIPE)
    seen, deadline = b"", time.time() + 120
    os.set_blocking(process.stderr.fileno(), False)
    while time.time() < deadline:
        seen += process.stderr.read() or b""
        done = [int(n) for n in re.findall(rb"(\d+)/40 ", seen)]
        if done and max(done) >= 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the ingest finished before it could be killed"

    resumed = subprocess.run(_cli("ingest", "--db", str(killed), *common), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumed)" in resumed.stderr
    assert _snapshot(killed) == _snapshot(whole)


def test_the_service_takes_the_ingest_commands_options_with_its_defaults():
    """POST /api/v1/runs accepts what `ingest` accepts (IngestSettings repeats the click options,
    so that the service needs no click): same names, defaults and choices."""
    import typing

    from catalog.cli.ingest import ingest as command
    from catalog.service.jobs import IngestSettings

    from catalog.jobs.settings import EngineSettings
    from catalog.settings import fields_of

    # Where the command runs the batches (--engine ray ...) is not the service's: it runs its jobs itself.
    engine = {f.name for f in fields_of(EngineSettings)}
    options = {p.name: p for p in command.params if p.name not in {"db_path", "server", *engine}}
    defaults = command.make_context("ingest", ["--db", "unused.duckdb"]).params  # as click resolves them
    fields = IngestSettings.model_fields
    assert set(options) == set(fields)
    for name, option in options.items():
        assert fields[name].default == defaults[name], name
        if hasattr(option.type, "choices"):
            assert set(typing.get_args(fields[name].annotation)) == set(option.type.choices), name
