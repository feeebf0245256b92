"""The overview commands: `heads` (every head of a run) and `diff` (two runs compared), checked
against plain-Python computations over the stored rows."""

import json
from collections import Counter, defaultdict

import duckdb
import pytest
from click.testing import CliRunner

from catalog.read import overview as query_overview
from catalog.cli import main
from catalog.jobs.ingest import ingest
from catalog.store import open_readonly

N_LAYERS, N_HEADS = 3, 4  # the tiny model
EDGE_KEY = ("layer", "head", "dest_pos", "src_pos", "side", "up_kind", "up_layer", "up_head", "up_src_pos")
FIRING_KEY = ("layer", "head", "dest_pos", "src_pos")


@pytest.fixture(scope="module")
def runs_db(tmp_path_factory, tiny_checkpoint, tiny_model):
    """Run 1: 6 IOI prompts; run 2: the same prompts, other thresholds; run 3: the first 4 of them
    (prompts of one run only); run 4: ACC++ on 3 prompts, decomposing two heads' firings."""
    db = tmp_path_factory.mktemp("overview") / "c.duckdb"
    common = dict(model_path=tiny_checkpoint, seed=2, batch_size=3, loaded_model=tiny_model)
    ingest(db, n_prompts=6, **common)
    ingest(db, n_prompts=6, sv_threshold=0.9, edge_threshold=0.8, **common)
    ingest(db, n_prompts=4, **common)
    ingest(db, n_prompts=3, method="accpp", seeding="none", heads="1.0,2.1", **common)
    return db


def fetch_dicts(db, sql, params=None):
    with duckdb.connect(str(db), read_only=True) as con:
        cursor = con.execute(sql, params or [])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- heads -------------------------------------------------------------------------------------

def expected_heads(db, run_id):
    """Per head, computed in Python from the stored firings, tokens, edges and firing_sides."""
    role = {(t["prompt_id"], t["pos"]): t["role"] or "other"
            for t in fetch_dicts(db, "SELECT prompt_id, pos, role FROM tokens WHERE run_id = ?", [run_id])}
    by_head = defaultdict(list)
    for f in fetch_dicts(db, "SELECT * FROM firings WHERE run_id = ?", [run_id]):
        by_head[f["layer"], f["head"]].append(f)
    edges = fetch_dicts(db, "SELECT layer, head, up_kind, up_layer, up_head FROM edges WHERE run_id = ?", [run_id])
    edges_in = Counter((e["layer"], e["head"]) for e in edges)
    edges_out = Counter((e["up_layer"], e["up_head"]) for e in edges if e["up_kind"] == "head")
    atoms = defaultdict(list)
    for s in fetch_dicts(db, "SELECT layer, head, n_atoms FROM firing_sides WHERE run_id = ?", [run_id]):
        atoms[s["layer"], s["head"]].append(s["n_atoms"])
    out = {}
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            fired = by_head[layer, head]
            pairs = Counter(f"{role[f['prompt_id'], f['dest_pos']]}->{role[f['prompt_id'], f['src_pos']]}"
                            for f in fired)
            mean = lambda values: sum(values) / len(values) if values else None
            out[layer, head] = {
                "n_firings": len(fired), "n_prompts": len({f["prompt_id"] for f in fired}),
                "mean_attn": mean([f["attn_weight"] for f in fired]), "mean_score": mean([f["score"] for f in fired]),
                "mean_n_svs": mean([f["n_svs"] for f in fired if f["n_svs"] is not None]),
                "mean_atoms": mean(atoms[layer, head]),
                "roles": [p for p, _ in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))][:3],
                "n_edges_in": edges_in[layer, head], "n_edges_out": edges_out[layer, head],
            }
    return out


@pytest.mark.parametrize("run_id, size_column", [(1, "mean_n_svs"), (4, "mean_atoms")])
def test_heads_lists_every_head_with_independent_numbers(runs_db, run_id, size_column):
    result = invoke("heads", "--db", runs_db, "--run", run_id, "--format", "json")
    assert result.exit_code == 0, result.output
    assert f"run {run_id}" in result.stderr
    got = json.loads(result.stdout)
    assert [(r["layer"], r["head"]) for r in got] == [(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]
    other = {"mean_n_svs", "mean_atoms"} - {size_column}
    assert all(size_column in r and not other & set(r) for r in got)
    expected = expected_heads(runs_db, run_id)
    assert sum(r["n_firings"] for r in got) > 0 and any(r["n_firings"] == 0 for r in got) == any(
        e["n_firings"] == 0 for e in expected.values())
    for row in got:
        want = expected[row["layer"], row["head"]]
        for column in ("n_firings", "n_prompts", "roles", "n_edges_in", "n_edges_out"):
            assert row[column] == want[column], (row, column)
        for column in ("mean_attn", "mean_score", size_column):
            assert row[column] == (None if want[column] is None else pytest.approx(want[column], rel=1e-6))


def test_heads_sorts_and_reads_the_latest_run_by_default(runs_db):
    con = open_readonly(runs_db)
    by_firings = query_overview.heads(con, run_id=1, sort="firings").to_pylist()
    con.close()
    counts = [r["n_firings"] for r in by_firings]
    assert counts == sorted(counts, reverse=True)
    latest = invoke("heads", "--db", runs_db, "--format", "csv")
    assert latest.exit_code == 0 and "run 4 (accpp" in latest.stderr
    assert latest.stdout.splitlines()[0].split(",")[:3] == ["layer", "head", "n_firings"]


# -- diff --------------------------------------------------------------------------------------

def keyed(db, table, run_id, key):
    """(prompt text, occurrence of that text, *key) -> row, as the diff matches them."""
    occurrence = dict(_prompt_keys(db, run_id))
    return {occurrence[r["prompt_id"]] + tuple(r[c] for c in key): r
            for r in fetch_dicts(db, f"SELECT * FROM {table} WHERE run_id = ?", [run_id])}


def expected_changes(db, table, run_a, run_b, key, values, tolerance=1e-5):
    a, b = keyed(db, table, run_a, key), keyed(db, table, run_b, key)
    both = {k for _, k in _prompt_keys(db, run_a)} & {k for _, k in _prompt_keys(db, run_b)}
    a = {k: v for k, v in a.items() if k[:2] in both}
    b = {k: v for k, v in b.items() if k[:2] in both}
    out = {}
    for k in a.keys() | b.keys():
        if k not in b:
            out[k] = "removed"
        elif k not in a:
            out[k] = "added"
        else:
            differs = any(
                (a[k][v] is None) != (b[k][v] is None) or (a[k][v] is not None and (
                    a[k][v] != b[k][v] if v == "n_svs"
                    else abs(a[k][v] - b[k][v]) > tolerance * max(abs(a[k][v]), abs(b[k][v])))) for v in values)
            out[k] = "changed" if differs else "same"
    return out


def _got_changes(db, rows, run_a, key):
    prompt_a = dict(_prompt_keys(db, run_a))
    return {prompt_a[r["prompt_a"]] + tuple(r[c] for c in key): r["change"] for r in rows}


def _prompt_keys(db, run_id):
    seen = Counter()
    for p in fetch_dicts(db, "SELECT prompt_id, text FROM prompts WHERE run_id = ? ORDER BY prompt_id", [run_id]):
        seen[p["text"]] += 1
        yield p["prompt_id"], (p["text"], seen[p["text"]])


@pytest.mark.parametrize("run_a, run_b", [(1, 2), (2, 1), (1, 3)])
def test_diff_matches_an_independent_comparison(runs_db, run_a, run_b):
    con = open_readonly(runs_db)
    try:
        for table, key, values, listing in (("edges", EDGE_KEY, ["weight"], query_overview.diff_edges),
                                            ("firings", FIRING_KEY, ["attn_weight", "score", "n_svs"],
                                             query_overview.diff_firings)):
            want = expected_changes(runs_db, table, run_a, run_b, key, values)
            rows = listing(con, run_a, run_b, changes=query_overview.CHANGES).to_pylist()
            assert len(rows) == len(want)
            assert _got_changes(runs_db, rows, run_a, key) == want
            summary = {r["table"]: r for r in query_overview.diff_summary(con, run_a, run_b).to_pylist()}[table]
            assert {c: summary[c] for c in query_overview.CHANGES} == {c: list(want.values()).count(c)
                                                                        for c in query_overview.CHANGES}
            # the default listing leaves out the unchanged rows, and orders changed, added, removed
            listed = [r["change"] for r in listing(con, run_a, run_b).to_pylist()]
            assert "same" not in listed and listed == sorted(listed, key=["changed", "added", "removed"].index)
        # other thresholds really changed something, and the same prompts were compared
        if {run_a, run_b} == {1, 2}:
            edge_summary = query_overview.diff_summary(con, run_a, run_b).to_pylist()[1]
            assert edge_summary["changed"] + edge_summary["added"] + edge_summary["removed"] > 0
    finally:
        con.close()


@pytest.mark.parametrize("run_a, run_b", [(1, 2), (2, 1)])
def test_diff_connections_add_up_the_edge_changes(runs_db, run_a, run_b):
    changes = expected_changes(runs_db, "edges", run_a, run_b, EDGE_KEY, ["weight"])
    a, b = keyed(runs_db, "edges", run_a, EDGE_KEY), keyed(runs_db, "edges", run_b, EDGE_KEY)
    want = defaultdict(lambda: dict.fromkeys(("n_a", "n_b", "added", "removed", "changed", "same", "weight_a",
                                              "weight_b"), 0))
    for key, change in changes.items():
        layer, head, _, _, side, up_kind, up_layer, up_head, _ = key[2:]
        row = want[layer, head, side, up_kind, up_layer, up_head]
        row[change] += 1
        if key in a:
            row["n_a"] += 1
            row["weight_a"] += a[key]["weight"]
        if key in b:
            row["n_b"] += 1
            row["weight_b"] += b[key]["weight"]
    con = open_readonly(runs_db)
    got = query_overview.diff_connections(con, run_a, run_b).to_pylist()
    con.close()
    assert len(got) == len(want) > 0
    for row in got:
        expected = want[row["layer"], row["head"], row["side"], row["up_kind"], row["up_layer"], row["up_head"]]
        for column in ("n_a", "n_b", "added", "removed", "changed", "same"):
            assert row[column] == expected[column], (row, column)
        for column in ("weight_a", "weight_b"):
            assert (row[column] or 0) == pytest.approx(expected[column], rel=1e-5, abs=1e-6)
    moved = [r["added"] + r["removed"] + r["changed"] for r in got]
    assert moved == sorted(moved, reverse=True) and moved[0] > 0


def test_diff_command_says_what_it_left_out(runs_db):
    result = invoke("diff", "--db", runs_db, "--run", 1, "--run", 3, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "4 prompts that both runs hold" in result.stderr and "2 prompts only in run 1" in result.stderr
    summary = json.loads(result.stdout)
    assert [r["table"] for r in summary] == ["firings", "edges"]
    assert all(r["added"] == r["removed"] == r["changed"] == 0 for r in summary)  # same prompts, same settings
    edges = invoke("diff", "--db", runs_db, "--run", 1, "--run", 2, "--show", "edges", "--change", "added",
                   "--top", 3, "--format", "json")
    assert edges.exit_code == 0, edges.output
    listed = json.loads(edges.stdout)
    assert len(listed) <= 3 and all(r["change"] == "added" and r["weight_a"] is None for r in listed)
