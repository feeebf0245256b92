"""Ingest progress that tells the truth: plain counts, a bar that is never a batch late, the whole
run's counts after a resume, status lines before the bar, and a finished run recognised without
loading the model, with the run's own time."""

import re
import shutil

import duckdb
import pytest
from click.testing import CliRunner

from catalog.cli import main
from catalog.jobs.ingest import Interrupted, ingest, progress_postfix

N_PROMPTS, BATCH, SEED = 10, 3, 4
# One painted state of the bar: "7/10 [..., firings=123, edges=456]"
STATE = re.compile(r"(\d+)/(\d+) \[[^\]]*firings=(\d+), edges=(\d+)\]")


def _states(stderr: str) -> list[tuple[int, int, int]]:
    return [(int(m.group(1)), int(m.group(3)), int(m.group(4))) for m in STATE.finditer(stderr)]


def _cumulative(db, run_id) -> dict[int, tuple[int, int]]:
    """prompts done -> (firings, edges) of the whole run at that point, from run_batches."""
    with duckdb.connect(str(db), read_only=True) as con:
        batches = con.execute("SELECT last_prompt + 1, n_firings, n_edges FROM run_batches WHERE run_id = ? "
                              "ORDER BY batch", [run_id]).fetchall()
    out, firings, edges = {0: (0, 0)}, 0, 0
    for done, n_firings, n_edges in batches:
        firings, edges = firings + n_firings, edges + n_edges
        out[done] = (firings, edges)
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_checkpoint, tiny_model):
    """A run interrupted after its first batch (this session loads the model itself), then resumed;
    the stderr of both sessions and the summary of the second."""
    db = tmp_path_factory.mktemp("progress") / "c.duckdb"
    args = dict(model_path=tiny_checkpoint, n_prompts=N_PROMPTS, seed=SEED, batch_size=BATCH, show_progress=True)
    import contextlib  # (capsys is function-scoped: stderr is captured by hand)
    import io

    def stop_after_first(batch):
        if batch == 0:
            raise KeyboardInterrupt

    first = io.StringIO()
    with contextlib.redirect_stderr(first), pytest.raises(Interrupted, match=f"{BATCH} of {N_PROMPTS} prompts"):
        ingest(db, on_batch=stop_after_first, **args)
    second = io.StringIO()
    with contextlib.redirect_stderr(second):
        summary = ingest(db, loaded_model=tiny_model, **args)
    return db, first.getvalue(), second.getvalue(), summary


def test_counts_are_plain_integers():
    from tqdm import tqdm

    assert "e+" in tqdm.format_num(100000)  # what tqdm's own postfix formatting would show
    assert progress_postfix(100000, 8_500_000) == "firings=100000, edges=8500000"
    assert "e+" not in progress_postfix(10**9, 12345678901)


def test_status_lines_come_before_the_bar(resumed):
    _, first, _, _ = resumed
    loading, decomposing = first.find("loading model"), first.find("decomposing the 12 heads")
    bar = first.find(f"0/{N_PROMPTS}")
    assert 0 <= loading < decomposing < bar, first


def test_the_bar_is_never_a_batch_late(resumed):
    db, first, second, summary = resumed
    truth = _cumulative(db, summary["run_id"])
    for stderr in (first, second):
        states = _states(stderr)
        assert states, stderr
        for done, firings, edges in states:
            assert truth[done] == (firings, edges), (done, firings, edges, truth)
    # the painted states cover every committed batch boundary of each session
    assert {s[0] for s in _states(first)} >= {0, BATCH}
    assert {s[0] for s in _states(second)} >= set(truth) - {0}


def test_after_a_resume_bar_and_summary_count_the_whole_run(resumed):
    db, _, second, summary = resumed
    assert "(resumed), counts of the whole run" in second
    last_done, last_firings, last_edges = _states(second)[-1]
    with duckdb.connect(str(db), read_only=True) as con:
        firings = con.execute("SELECT count(*) FROM firings WHERE run_id = ?", [summary["run_id"]]).fetchall()[0][0]
        edges = con.execute("SELECT count(*) FROM edges WHERE run_id = ?", [summary["run_id"]]).fetchall()[0][0]
    assert (last_done, last_firings, last_edges) == (N_PROMPTS, firings, edges)
    assert (summary["prompts"], summary["firings"], summary["edges"]) == (N_PROMPTS, firings, edges)
    assert summary["resumed"] and summary["prompts_this_session"] == N_PROMPTS - BATCH

    from catalog.cli.ingest import summary_line

    line = summary_line(summary, "x")
    assert "resumed; counts are the whole run's" in line and f"this session {N_PROMPTS - BATCH} prompts" in line


def _run_seconds(db, run_id) -> float:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT epoch(finished_at - started_at) FROM runs WHERE run_id = ?",
                           [run_id]).fetchall()[0][0]


def test_a_finished_run_is_reported_without_loading_the_model(resumed, tiny_checkpoint, monkeypatch):
    db, _, _, summary = resumed

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("catalog.models.loading.load_model", no_load)
    again = ingest(db, model_path=tiny_checkpoint, n_prompts=N_PROMPTS, seed=SEED, batch_size=BATCH)
    assert again["already_finished"] and again["run_id"] == summary["run_id"]
    assert again["wall_s"] == pytest.approx(_run_seconds(db, summary["run_id"]), abs=1e-3)
    # the same through the command line, which prints the run's own time
    result = CliRunner().invoke(main, ["ingest", "--db", str(db), "--model-path", str(tiny_checkpoint),
                                       "--n-prompts", str(N_PROMPTS), "--seed", str(SEED),
                                       "--batch-size", str(BATCH)])
    assert result.exit_code == 0, result.output
    assert "is already finished" in result.stdout
    assert f"the run took {_run_seconds(db, summary['run_id']):.1f} s" in result.stdout
    assert "loading model" not in result.output
    # other settings are another run: that one needs the model
    with pytest.raises(AssertionError, match="the model was loaded"):
        ingest(db, model_path=tiny_checkpoint, n_prompts=N_PROMPTS, seed=SEED, batch_size=BATCH, sv_threshold=0.9)


def test_a_catalog_without_checkpoint_digests_loads_the_model_to_tell(resumed, tiny_checkpoint, tiny_model,
                                                                      tmp_path, monkeypatch):
    db, _, _, summary = resumed
    old = tmp_path / "old.duckdb"
    shutil.copy(db, old)
    with duckdb.connect(str(old)) as con:  # as an ingest before checkpoint digests wrote it
        con.execute("UPDATE runs SET params = json_merge_patch(params, '{\"checkpoint_digest\": null}')")
        assert con.execute("SELECT count(*) FROM runs WHERE params::VARCHAR LIKE '%checkpoint_digest%'"
                           ).fetchall()[0][0] == 0
    loads = []
    monkeypatch.setattr("catalog.models.loading.load_model", lambda *a, **k: loads.append(a) or tiny_model)
    again = ingest(old, model_path=tiny_checkpoint, n_prompts=N_PROMPTS, seed=SEED, batch_size=BATCH)
    assert again["already_finished"] and again["run_id"] == summary["run_id"] and len(loads) == 1
    assert again["wall_s"] == pytest.approx(_run_seconds(old, summary["run_id"]), abs=1e-3)
