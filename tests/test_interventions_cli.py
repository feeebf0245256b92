"""`circuit-catalog intervene` on real catalogs of a small random model (both methods), the rows it
stores and how they join, its bad input, and the edges/head commands reading the effects."""

import re
import shutil
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from catalog.cli import main
from catalog.jobs.ingest import ingest


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sql(db, query, params=None):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query, params or []).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def catalogs(tiny_checkpoint, tiny_model, tmp_path_factory):
    """Run 1: the 2024 method, 4 IOI prompts; run 2: ACC++ on 2 of them, the firings of layer 2's heads
    (every kind of upstream component: heads, MLPs, embedding, offsets)."""
    db = tmp_path_factory.mktemp("interventions") / "ioi.duckdb"
    ingest(db, model_path=tiny_checkpoint, n_prompts=4, seed=0, batch_size=4, loaded_model=tiny_model)
    ingest(db, model_path=tiny_checkpoint, n_prompts=2, seed=0, batch_size=2, method="accpp", seeding="none",
           heads="2.0,2.1,2.2,2.3", loaded_model=tiny_model)  # no seeding: the tiny model's own firings
    return db


@pytest.fixture
def db(catalogs, tmp_path):
    copy = tmp_path / "ioi.duckdb"
    shutil.copy(catalogs, copy)
    return copy


def test_one_row_per_edge_joined_on_the_edge_identity(db):
    result = invoke("intervene", "--db", db, "--run", 1)
    assert result.exit_code == 0, result.output
    n_edges = sql(db, "SELECT count(*) FROM edges WHERE run_id = 1")[0][0]
    assert re.search(rf"run 1 \(sad\), local ablate: {n_edges} of {n_edges} selected edges intervened", result.output)
    rows = sql(db, """
        SELECT i.pos, e.side, e.dest_pos, e.src_pos, i.attn_before, f.attn_weight, i.other_logit_change,
               i.logit_diff_before, p.logit_diff, i.norm_ratio, i.kl_div
        FROM interventions i
        JOIN edges e USING (run_id, prompt_id, edge_id)
        JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)
        JOIN prompts p USING (run_id, prompt_id)
        WHERE i.run_id = 1 AND i.mode = 'local' AND NOT i.boost""")
    assert len(rows) == n_edges
    for pos, side, dest, src, before, firing_attn, other, diff_before, prompt_diff, ratio, kl in rows:
        assert pos == (dest if side == "query" else src)
        assert before == pytest.approx(firing_attn, abs=1e-5)  # the firing the edge belongs to
        assert other == 0.0 and kl >= -1e-7 and ratio > 0
        if prompt_diff is not None:  # the run's own record of the clean logit difference
            assert diff_before == pytest.approx(prompt_diff, abs=1e-4)
    # The same command again stores nothing twice.
    again = invoke("intervene", "--db", db, "--run", 1)
    assert again.exit_code == 0 and f"({n_edges} already stored)" in again.output
    assert sql(db, "SELECT count(*) FROM interventions")[0][0] == n_edges


def test_selection_options(db):
    result = invoke("intervene", "--db", db, "--run", 1, "--top-edges", 2, "--boost", "--mode", "global")
    assert result.exit_code == 0, result.output
    per_prompt = sql(db, "SELECT prompt_id, count(*) FROM interventions GROUP BY prompt_id")
    assert per_prompt and all(n == 2 for _, n in per_prompt)
    heaviest = sql(db, """
        SELECT count(*) FROM interventions i JOIN edges e USING (run_id, prompt_id, edge_id)
        WHERE e.weight < (SELECT max(weight) FROM edges x WHERE x.run_id = 1 AND x.prompt_id = e.prompt_id)
          AND e.weight < (SELECT weight FROM edges x WHERE x.run_id = 1 AND x.prompt_id = e.prompt_id
                          ORDER BY weight DESC LIMIT 1 OFFSET 1)""")[0][0]
    assert heaviest == 0
    assert sql(db, "SELECT DISTINCT mode, boost FROM interventions") == [("global", True)]
    result = invoke("intervene", "--db", db, "--run", 1, "--prompt", 3, "--heads", "2.0,2.1", "--min-weight", 0.5)
    assert result.exit_code == 0, result.output
    want = sql(db, "SELECT count(*) FROM edges WHERE run_id = 1 AND prompt_id = 3 AND layer = 2 AND head IN (0, 1) "
                   "AND weight >= 0.5")[0][0]
    got = sql(db, "SELECT count(*) FROM interventions WHERE mode = 'local'")[0][0]
    assert got == want > 0


def test_accpp_runs_local_and_global(db):
    assert invoke("intervene", "--db", db, "--run", 2).exit_code == 0
    result = invoke("intervene", "--db", db, "--run", 2, "--mode", "global")
    assert result.exit_code == 0, result.output
    kinds = dict(sql(db, "SELECT up_kind, count(*) FROM edges WHERE run_id = 2 GROUP BY up_kind"))
    stored = dict(sql(db, """SELECT i.mode, count(*) FROM interventions i JOIN edges e USING (run_id, prompt_id, edge_id)
                             GROUP BY i.mode"""))
    n = sum(kinds.values())
    assert stored["local"] == n and stored["global"] == n - kinds.get("offset", 0)
    if kinds.get("offset"):
        assert f"{kinds['offset']} AH-offset edges skipped" in result.output
    # An ACC++ edge's weight is the attention its atoms remove; ablating it must lower that attention.
    assert sql(db, "SELECT avg(attn_before - attn_after) FROM interventions WHERE run_id = 2 AND mode = 'local'")[0][0] > 0


@pytest.mark.parametrize("args,message", [
    (["--top-edges", 3, "--min-weight", 1.0], "at most one of --top-edges"),
    (["--top-edges", 0], "--top-edges must be at least 1"),
    (["--heads", "9.9"], "no head 9.9"),
    (["--run", 99], "no run 99"),
    (["--prompt", 99], "has no prompt 99"),
    (["--min-weight", 1e9], "no edge of run"),
    (["--mode", "sideways"], "--mode"),
])
def test_bad_input_is_one_line(db, args, message):
    result = invoke("intervene", "--db", db, *args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_a_missing_catalog_and_another_model(db, tmp_path):
    result = invoke("intervene", "--db", tmp_path / "none.duckdb")
    assert result.exit_code == 1 and "no catalog at" in result.output
    from catalog.testing import save_random_gpt2

    other = save_random_gpt2(tmp_path / "other", n_layer=3, n_head=4, n_embd=64, seed=5)
    result = invoke("intervene", "--db", db, "--run", 1, "--model-path", other)
    assert result.exit_code == 1 and "is not the model of run 1" in result.output


def test_a_bfloat16_run_is_intervened_on_with_its_own_weights(tiny_checkpoint, tmp_path):
    """The run's model is loaded in the run's precision (in float32 its weights are other weights,
    refused by digest); the replayed clean attention is the stored one up to bfloat16 rounding."""
    db = tmp_path / "bf16.duckdb"
    ingest(db, model_path=tiny_checkpoint, n_prompts=3, seed=2, batch_size=3, dtype="bfloat16")
    result = invoke("intervene", "--db", db, "--top-edges", "2")
    assert result.exit_code == 0, result.output
    rows = sql(db, """SELECT i.attn_before, f.attn_weight FROM interventions i JOIN edges e USING (run_id, prompt_id,
                      edge_id) JOIN firings f USING (run_id, prompt_id, layer, head, dest_pos, src_pos)""")
    assert len(rows) == 6 and all(abs(before - stored) < 0.03 for before, stored in rows)


def test_edges_and_head_show_and_filter_by_effect(db):
    assert invoke("intervene", "--db", db, "--run", 1).exit_code == 0
    plain = invoke("edges", "--db", db, "--run", 1, "--into", "2.1", "--format", "csv")
    assert plain.exit_code == 0 and "mean_effect" not in plain.output
    shown = invoke("edges", "--db", db, "--run", 1, "--into", "2.1", "--effect", "--format", "json")
    assert shown.exit_code == 0, shown.output
    import json

    rows = json.loads(shown.stdout)
    # One row per (upstream head, side): its mean effect and how many of its edges were tested,
    # compared as a multiset (independent of how the command names the heads).
    want = sorted((side, round(effect, 5), n) for side, effect, n in sql(db, """
        SELECT e.side, avg(i.attn_before - i.attn_after), count(i.edge_id)
        FROM edges e LEFT JOIN interventions i ON i.run_id = e.run_id AND i.prompt_id = e.prompt_id
             AND i.edge_id = e.edge_id AND i.mode = 'local' AND NOT i.boost
        WHERE e.run_id = 1 AND e.layer = 2 AND e.head = 1 GROUP BY e.up_layer, e.up_head, e.side"""))
    assert sorted((r["side"], round(r["mean_effect"], 5), r["n_tested"]) for r in rows) == want
    cut = sorted(r["mean_effect"] for r in rows)[len(rows) // 2]
    kept = json.loads(invoke("edges", "--db", db, "--run", 1, "--into", "2.1", "--min-effect", cut,
                             "--format", "json").stdout)
    assert sorted((r["side"], r["mean_effect"]) for r in kept) == sorted(
        (r["side"], r["mean_effect"]) for r in rows if r["mean_effect"] >= cut)
    head = invoke("head", "--db", db, "--run", 1, "2.1", "--effect")
    assert head.exit_code == 0 and "mean_effect" in head.output
    # No global interventions stored: the effect is there, unmeasured.
    glob = json.loads(invoke("edges", "--db", db, "--run", 1, "--into", "2.1", "--effect", "--effect-mode", "global",
                             "--format", "json").stdout)
    assert all(r["n_tested"] == 0 and r["mean_effect"] is None for r in glob)


def test_readme_question_runs(db):
    """The README's "which of 9.9's query edges actually matter" SQL, on this catalog's 2.1."""
    assert invoke("intervene", "--db", db, "--run", 1, "--heads", "2.1").exit_code == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("which of 9.9's query edges actually matter")[1].split("```sql")[1].split("```")[0]
    query = block.replace("e.layer = 9 AND e.head = 9", "e.layer = 2 AND e.head = 1")
    assert query != block
    rows = sql(db, query)
    assert rows and all(r[-1] is None or r[-1] >= 0 for r in rows) or rows == []


def test_trace_shows_and_filters_by_effect(db):
    import json

    assert invoke("intervene", "--db", db, "--run", 1).exit_code == 0
    args = ["trace", "--db", db, "--run", 1, "--root", "2.1", "--dest-role", "any", "--src-role", "any",
            "--format", "json"]
    def edges_of(result):  # the JSON is the edge list, or a document holding it
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        return document["edges"] if isinstance(document, dict) else document

    plain = edges_of(invoke(*args))
    shown = edges_of(invoke(*args, "--effect"))
    assert plain and "mean_effect" not in plain[0] and len(shown) == len(plain)
    writes = [e for e in shown if e["kind"] == "writes"]
    assert all(e["mean_effect"] is not None for e in writes)
    cut = sorted(e["mean_effect"] for e in writes)[len(writes) // 2]
    kept = edges_of(invoke(*args, "--min-effect", cut))
    kept_writes = [e for e in kept if e["kind"] == "writes"]
    assert 0 < len(kept_writes) < len(writes) and all(e["mean_effect"] >= cut for e in kept_writes)
    assert {(e["source"], e["target"], e["side"]) for e in kept_writes} == {
        (e["source"], e["target"], e["side"]) for e in writes if e["mean_effect"] >= cut}
    # ACC++ run (no seeds in this fixture, so its stored circuit is empty): the same options work.
    result = invoke("trace", "--db", db, "--run", 2, "--min-effect", 0.1, "--format", "json")
    assert result.exit_code == 0, result.output
